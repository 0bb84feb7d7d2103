from tests.conftest import request


def test_generate_b64(shared_agent, client):
    client.subscribe(f"{shared_agent.base}/result/+", f"{shared_agent.base}/jobs/+")
    client.publish(f"{shared_agent.base}/generate", request(id="smoke1", seed=5))
    result = client.wait_for(f"{shared_agent.base}/result/smoke1").json()
    print(result["timings"], result["image"].keys())
    assert result["status"] == "ok"
