# The job image: `python -m job check|prepare|train|evaluate|predict` on a CUDA machine.
#   socrates-launch image build [--push REPO]     # docker buildx; tag lock-<sha256 of job.lock + this file>
#   docker run --gpus all -v "$PWD":/w socrates-launch-job:lock-... check --config /w/paper.yaml
# Its build context is a run's staged folder (launcher/stage.py): job/, contracts/, requirements/*.lock,
# configs/socsci210_stats.json (the table job check reads) and this file.
# `socrates-launch up --image REF` runs it as SkyPilot's runtime (image_id: docker:REF; setup installs
# nothing, the synced workdir's job/ runs with /opt/venv/bin/python); the SSH backend runs it with docker.
# Base pinned by digest. torch's CUDA 13.0 libraries come from the lock (PyPI wheels), so the base
# only has to match the driver side (CUDA 13.0). The digest is the one public Dockerfiles pin for
# this tag; it was not re-resolved against Docker Hub from here (no registry access): verify with
# `docker buildx imagetools inspect nvidia/cuda:13.0.3-cudnn-runtime-ubuntu24.04` on the next bump.
FROM nvidia/cuda:13.0.3-cudnn-runtime-ubuntu24.04@sha256:14f6d08d1cd4a96effbfe3101d0b56326f552c199d05e4979ee0bd616df5811b

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1

# Ubuntu 24.04's python3 is 3.12: the Python the lock was compiled for. rsync and curl: what SkyPilot
# needs in an image it uses as the runtime (it syncs the workdir with rsync; the container runs as root).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates rsync curl \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    UV_NO_CACHE=1

WORKDIR /app
# The install of sky/train.yaml's setup block, the same commands: uv pinned by hash in a folder of its own,
# then every package of the lock, exact version and hash, synced into the job's venv; nothing resolved here.
COPY requirements/uv.lock requirements/job.lock requirements/
RUN python3 -m venv /opt/venv \
 && python3 -m pip install -q --no-deps --require-hashes --target /opt/uv -r requirements/uv.lock \
 && /opt/uv/bin/uv pip sync -q --python /opt/venv/bin/python --require-hashes requirements/job.lock

COPY contracts/ contracts/
COPY job/ job/
COPY configs/ configs/
RUN python -m job.stack

ENTRYPOINT ["python", "-m", "job"]
CMD ["--help"]
