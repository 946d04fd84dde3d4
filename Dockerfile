# The image the Helm chart runs on every Ray pod: Ray 2.60 + CUDA, Python 3.11, and this project
# installed with its pinned constraints (on this base, torch==2.13.0 resolves to PyPI's CUDA build).
#   docker build -t REGISTRY/moe-serve:0.1.0 .
# The Ray version of the base image, constraints.txt and the chart's ray.version must agree.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

# Attention compiles its kernels at run time (torch.compile: C++ on CPU, Triton on CUDA), which
# needs a C/C++ compiler on every node.
USER root
RUN command -v g++ || (apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*)

# The base image's user, ray (uid 1000, group users 100); numeric so runAsNonRoot can verify it.
USER 1000:100
ARG SRC=/home/ray/moe-serve

# Dependencies first, in a layer of their own: editing the source does not re-download torch.
COPY --chown=1000:100 pyproject.toml constraints.txt ${SRC}/
RUN cd ${SRC} \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r requirements.txt

# The project. Serve's proxies import the gRPC servicer functions when they start, on every
# node, so the generated protos must be importable from the installed package: checked here.
COPY --chown=1000:100 . ${SRC}/
RUN pip install --no-cache-dir -c ${SRC}/constraints.txt ${SRC} \
    && rm -rf ${SRC} \
    && cd /tmp \
    && python -c "import moe_serve.deploy.app, moe_serve.protos.moe_serving_pb2_grpc, grpc_health.v1.health_pb2_grpc"

WORKDIR /home/ray
ENV HF_HOME=/home/ray/.cache/huggingface
