# Multi-stage build of the tollgate binary. The build stage runs the same steps as .ci/run:
# cmake for Pingora's zlib-ng, then a locked cargo build.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml rustfmt.toml ./
COPY src ./src
COPY tests ./tests
COPY benches ./benches
COPY vendor ./vendor
RUN cargo build --release --locked --bin tollgate

FROM debian:bookworm-slim
# The CLI checks an https admin API's certificate against the system's trusted ones.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home-dir /var/lib/tollgate --create-home tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY config/docker.yaml /etc/tollgate/tollgate.yaml
USER tollgate
WORKDIR /var/lib/tollgate
EXPOSE 8080 8081
ENTRYPOINT ["tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.yaml"]
