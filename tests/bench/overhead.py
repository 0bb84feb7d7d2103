"""Measure the agent's own overhead: end-to-end MQTT latency minus generation time.

Starts a mosquitto broker (the project's config) and the agent with the tiny SDXL pipeline, sends
N requests one after another (512x512, 1 step, base64 PNG) and prints, per request and as
medians: the latency a client sees (publish to result received), the generation time the agent
reports, and the difference (parsing, queueing, the worker pipe, PNG encoding, base64, file
write, MQTT both ways).

Run: .venv/bin/python tests/bench/overhead.py [N]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import AgentProcess, start_broker
from tests.tiny_pipeline import build_tiny_pipeline


def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = build_tiny_pipeline(root / "model")
        broker = start_broker(root / "broker")
        agent = AgentProcess(broker, model, root / "agent", {"EDGEAI_TORCH_THREADS": "0"})
        agent.start()
        client = broker.client()
        client.subscribe(f"{agent.base}/result/+")
        rows = []
        try:
            for index in range(count + 1):
                job_id = uuid.uuid4().hex[:12]
                began = time.perf_counter()
                client.publish(
                    f"{agent.base}/generate", json.dumps({"prompt": "a red apple", "id": job_id})
                )
                result = client.wait_for(f"{agent.base}/result/{job_id}").json()
                seen = time.perf_counter() - began
                if index == 0:
                    continue  # the first job warms caches; not counted
                timings = result["timings"]
                rows.append(
                    (
                        seen,
                        timings["generation_s"],
                        timings["encoding_s"],
                        len(result["image"]["b64"]),
                    )
                )
        finally:
            client.close()
            agent.stop()
            broker.stop()
    print(f"{count} requests, 512x512, 1 step, base64 PNG, tiny model")
    print("| request | end-to-end s | generation s | overhead s | of which PNG encoding s |")
    print("| --- | --- | --- | --- | --- |")
    for index, (seen, generation, encoding, _) in enumerate(rows, 1):
        print(
            f"| {index} | {seen:.4f} | {generation:.4f} "
            f"| {seen - generation:.4f} | {encoding:.4f} |"
        )
    overhead = [seen - generation for seen, generation, _, _ in rows]
    print(
        json.dumps(
            {
                "requests": count,
                "median_end_to_end_s": round(statistics.median(r[0] for r in rows), 4),
                "median_generation_s": round(statistics.median(r[1] for r in rows), 4),
                "median_overhead_s": round(statistics.median(overhead), 4),
                "p90_overhead_s": round(statistics.quantiles(overhead, n=10)[-1], 4),
                "median_png_encoding_s": round(statistics.median(r[2] for r in rows), 4),
                "base64_chars": rows[-1][3],
            }
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
