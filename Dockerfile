# tokenrec training/serving image (CPU). `docker build -t tokenrec .` then
#   docker run --rm tokenrec demo
# The same lock file as `make install`; torchrec goes in without its dependencies so that the
# CPU build of FBGEMM (fbgemm-gpu-cpu) is used. For the GPU variant see docs/gpu.md.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends make gcc g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/tokenrec
COPY requirements/ requirements/
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX_URL"; fi \
 && pip install --no-cache-dir -r requirements/cpu.lock \
 && pip install --no-cache-dir --no-deps -r requirements/torchrec.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
ENTRYPOINT ["tokenrec"]
CMD ["--help"]
