"""HTTP: the server, the web page and its JSON API, images, metrics and health."""
