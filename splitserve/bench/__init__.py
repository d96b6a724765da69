"""The benchmark harness behind ``splitserve bench``: workloads (what to send, when),
clients (KServe v2 gRPC streaming, OpenAI SSE), an open-loop runner, metrics
(TTFT, TPOT, SLO attainment, goodput) and reports (JSON, PNG plots)."""
