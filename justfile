# The shop: Rust host + Wasm service components on Kafka.

# List the recipes.
default:
    @just --list

# What this machine lacks for `just run` and `just test`, and how to get it
# (exits non-zero when something `just test` needs is missing).
doctor:
    scripts/doctor.sh

# Build the host (and gateway).
build:
    cargo build -p host

# Build every service component app.toml serves (never the host), and the
# JavaScript services (components/*/build.sh: need node and npm; `npm ci`
# from their lock files). Adds the wasm32-wasip2 target to the pinned
# toolchain when it lacks it.
build-components:
    scripts/build-components.sh

# Build one service component, e.g. `just build-component payment`
# (a JavaScript one, e.g. `email-js`, with its build.sh: target/wasm32-wasip2/release/email-js.wasm).
build-component NAME:
    if [ -x components/{{ NAME }}/build.sh ]; then components/{{ NAME }}/build.sh; else cargo build --release --target wasm32-wasip2 -p {{ NAME }}; fi

# Add a service: components/NAME (a handler, a unit test on MemoryHost), a
# workspace member and a block in app.toml (next free port, topic NAME), so
# that `just run` serves it. `--lang js` writes a JavaScript one.
new-service NAME *FLAGS:
    scripts/new-service.sh {{ NAME }} {{ FLAGS }}

# Build the test-only components (used by the host's tests).
# The payment and email variants are built with features and copied aside;
# each plain build runs last so that payment.wasm and email.wasm are the real
# ones again.
build-test-components:
    cargo build --release --target wasm32-wasip2 -p misbehave --lib --bins
    cargo build --release --target wasm32-wasip2 -p payment --features v2
    cp target/wasm32-wasip2/release/payment.wasm target/wasm32-wasip2/release/payment-v2.wasm
    cargo build --release --target wasm32-wasip2 -p payment --features trap
    cp target/wasm32-wasip2/release/payment.wasm target/wasm32-wasip2/release/payment-trap.wasm
    cargo build --release --target wasm32-wasip2 -p payment --features spin
    cp target/wasm32-wasip2/release/payment.wasm target/wasm32-wasip2/release/payment-spin.wasm
    cargo build --release --target wasm32-wasip2 -p payment
    cargo build --release --target wasm32-wasip2 -p email --features fail
    cp target/wasm32-wasip2/release/email.wasm target/wasm32-wasip2/release/email-fail.wasm
    cargo build --release --target wasm32-wasip2 -p email

# Regenerate schemas/ (one JSON Schema per event type) from components/events' Rust types.
schemas:
    UPDATE_SCHEMAS=1 cargo test -p host --lib schemas::tests::the_checked_in_schemas_are_the_generated_ones

# Run the whole system: gateway on :3005, the components on their manifest ports (:3001-3004 and up).
run: build-components build
    cargo run -p host -- run --manifest app.toml

# Validate the manifest and every component without serving.
check: build-components build
    cargo run -p host -- check --manifest app.toml

# Time to healthy, closed and open loops, latency by polling and on the topic,
# host CPU and memory, each component's stage costs, a hot swap under load;
# then the broker's limit with plain Kafka relays, and Wasm vs native per
# event. Options go to `bench suite` (`just bench --rates 100`);
# BENCH_PORT_OFFSET=10000 runs it beside a host already on :3001-3005.
# Measure the system end to end on a real broker (results in target/bench/).
bench *ARGS: build-components build
    scripts/bench.sh {{ ARGS }}

# Start a single-node Apache Kafka (KRaft) on 127.0.0.1:9092 (fetched from Maven once).
kafka:
    scripts/kafka.sh start

# Stop the broker started by `just kafka`.
kafka-stop:
    scripts/kafka.sh stop

# Start a local PostgreSQL on 127.0.0.1:5432 (Debian's postgresql package, data in .postgres/).
postgres:
    scripts/postgres.sh start

# Stop the server started by `just postgres`.
postgres-stop:
    scripts/postgres.sh stop

# Start a schema registry (Apicurio Registry, Confluent-compatible API) on 127.0.0.1:8089 (fetched from Maven once; Java 21+).
registry:
    scripts/registry.sh start

# Stop the registry started by `just registry`.
registry-stop:
    scripts/registry.sh stop

# Lint the Dockerfile, compose.yaml and the image's manifest without a Docker engine (tools in .venv-tools/).
check-containers:
    scripts/validate-containers.sh

# Everything: formatting, lints, container files, unit tests, end-to-end on a real broker, PostgreSQL and schema registry, browser test, gateway fuzzing, CloudEvents SDK interop.
test: build-components build-test-components build
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    scripts/validate-containers.sh
    scripts/kafka.sh start
    scripts/postgres.sh start
    scripts/registry.sh start
    DATABASE_URL="$(scripts/postgres.sh url)" SCHEMA_REGISTRY_URL="$(scripts/registry.sh url)" KAFKA_BROKERS=127.0.0.1:9092 cargo test --workspace
    KAFKA_BROKERS=127.0.0.1:9092 scripts/browser-test.sh
    KAFKA_BROKERS=127.0.0.1:9092 scripts/fuzz-gateway.sh
    KAFKA_BROKERS=127.0.0.1:9092 scripts/interop-test.sh
