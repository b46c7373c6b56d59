# walbust, built from source on Debian bookworm.
#
#   docker build -t walbust:local .
#   docker run --rm walbust:local --help
#
# Stage 1 compiles with the -dev packages; stage 2 carries only the runtime
# libraries, curl (for the compose health check) and the binary, and runs
# as an unprivileged user. The image's entry point is `walbust`: pass the
# subcommand (run, setup, status, check, decode) as the command.

FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        build-essential pkg-config \
        libpq-dev libhiredis-dev libcjson-dev libmicrohttpd-dev libsystemd-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what `make build/walbust` reads (see .dockerignore for the rest).
COPY Makefile VERSION ./
COPY scripts/ scripts/
COPY cdc/ cdc/
COPY redis/ redis/
COPY sql/ sql/
RUN make -j"$(nproc)" build/walbust \
 && ./build/walbust --version

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        libpq5 libhiredis0.14 libcjson1 libmicrohttpd12 libsystemd0 libssl3 \
        ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin walbust
COPY --from=build /src/build/walbust /usr/local/bin/walbust
COPY rules/ /etc/walbust/rules/
# Inside a container the metrics endpoint must be reachable from other
# containers (Prometheus); publish it on the host's loopback only (see
# docker-compose.yml). Override with WALBUST_METRICS=off to disable.
ENV WALBUST_METRICS=0.0.0.0:9187 \
    WALBUST_RULES=/etc/walbust/rules/example.json
EXPOSE 9187
USER walbust
# SIGTERM drains (finishes the in-flight batch, confirms, exits 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/walbust"]
CMD ["run"]
