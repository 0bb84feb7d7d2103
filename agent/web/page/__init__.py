"""The web page's files (HTML, CSS, JavaScript), served by the agent."""
