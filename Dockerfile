# Runtime images for llorch, built from binaries compiled outside Docker, so
# a build needs no registry, no network and no compiler:
#
#   go tool task image                          # scratch base, static binaries
#   go tool task image BASE=debian:bookworm     # glibc base, cgo edge (NVML)
#
# or by hand, from the repository root, after building bin/control and
# bin/edge (the build context is the repository; .dockerignore keeps it to bin/):
#
#   DOCKER_BUILDKIT=0 docker build --target control -t llorch/control .
#   DOCKER_BUILDKIT=0 docker build --target edge -t llorch/edge .
#
# Build arguments:
#   BASE  the base image of both stages (default scratch). scratch needs
#         static binaries (CGO_ENABLED=0); such an edge reports no GPUs. An
#         edge that reads GPUs through NVML is a cgo build (CGO_ENABLED=1) on
#         a glibc base (debian, ubuntu), into which the NVIDIA container
#         runtime injects libnvidia-ml.so.1 (run it with --gpus all). The
#         base must already be in the local image store: nothing is pulled
#         unless the engine can reach a registry.
#   BIN   the directory in the build context holding control and edge
#         (default bin, where `go tool task build` puts them).
#
# Works with the classic builder (DOCKER_BUILDKIT=0) and with BuildKit. Never
# add a "# syntax=" line: BuildKit would fetch a frontend image from a registry.
ARG BASE=scratch

FROM ${BASE} AS control
ARG BIN=bin
COPY ${BIN}/control /usr/local/bin/control
ENV LLORCH_DATA=/var/lib/llorch
WORKDIR /var/lib/llorch
EXPOSE 8443
ENTRYPOINT ["/usr/local/bin/control"]
CMD ["serve", "--listen", "0.0.0.0:8443"]

FROM ${BASE} AS edge
ARG BIN=bin
COPY ${BIN}/edge /usr/local/bin/edge
ENV LLORCH_EDGE_STATE=/var/lib/llorch-edge LLORCH_ENGINES_DIR=/run/llorch/engines
WORKDIR /run/llorch/engines
WORKDIR /var/lib/llorch-edge
ENTRYPOINT ["/usr/local/bin/edge"]
CMD ["run"]
