#!/usr/bin/env bash
# What this machine lacks for `just run` and `just test`, and how to get it,
# before a long build fails on it. Exits 1 when something `just test` needs is
# missing; recommended extras are reported without failing.
#
# Commands are for Debian/Ubuntu (what .ci/run installs); names are similar
# elsewhere.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MISSING=0
ok() { printf '  ok       %-22s %s\n' "$1" "$2"; }
missing() {
  printf '  MISSING  %-22s %s\n' "$1" "$2"
  MISSING=$((MISSING + 1))
}
optional() { printf '  optional %-22s %s\n' "$1" "$2"; }
have() { command -v "$1" >/dev/null 2>&1; }
first_line() { "$@" 2>&1 | head -n 1; }

echo "Rust (rust-toolchain.toml pins the release, the wasm32-wasip2 target, rustfmt and clippy)"
# shellcheck source=scripts/wasm-target.sh
. scripts/wasm-target.sh
toolchain="$(pinned_toolchain)"
if have rustup; then
  ok rustup "$(first_line rustup --version)"
  if rustup toolchain list | grep -q "^$toolchain"; then
    ok "toolchain $toolchain" "$(first_line rustc "+$toolchain" --version)"
    # rustup installs a toolchain file's targets only with the toolchain
    # itself: a release installed before lacks wasm32-wasip2 until someone
    # adds it (`just build-components` does).
    if has_wasm_target; then
      ok wasm32-wasip2 "installed for $toolchain"
    else
      missing wasm32-wasip2 "rustup target add wasm32-wasip2 --toolchain $toolchain (just build-components runs it)"
    fi
  else
    ok "toolchain $toolchain" "not yet: rustup installs it (~250 MB) with wasm32-wasip2 on the first cargo command here"
  fi
else
  missing "rustup" "curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal"
fi

echo "C toolchain (librdkafka is built from source with TLS, linked against OpenSSL)"
for tool in cc c++ make pkg-config; do
  if have "$tool"; then ok "$tool" "$(command -v "$tool")"; else missing "$tool" "apt-get install build-essential pkg-config"; fi
done
if pkg-config --exists openssl 2>/dev/null; then
  ok "OpenSSL headers" "$(pkg-config --modversion openssl)"
else
  missing "OpenSSL headers" "apt-get install libssl-dev"
fi

echo "just"
if have just; then ok just "$(first_line just --version)"; else
  missing just "cargo install just (or: pipx install rust-just; apt-get install just on Debian 13+)"
fi

echo "Apache Kafka for just kafka / just test (Java 17+; Maven fetches the broker once)"
if have java; then
  version="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)"
  if [ "${version:-0}" -ge 17 ]; then ok "java" "$(first_line java -version)"; else
    missing "java >= 17" "found ${version:-unknown}: apt-get install openjdk-17-jre-headless"
  fi
else
  missing "java >= 17" "apt-get install openjdk-17-jre-headless"
fi
kafka_version="${KAFKA_VERSION:-$(sed -n 's/^KAFKA_VERSION="\${KAFKA_VERSION:-\(.*\)}"$/\1/p' scripts/kafka.sh)}"
if ls ".kafka/lib-$kafka_version"-*/.complete >/dev/null 2>&1; then
  ok "Kafka $kafka_version jars" "in .kafka/ (Maven no longer needed)"
elif have mvn; then
  ok mvn "$(first_line mvn -v | sed 's/\x1b\[[0-9;]*m//g')"
else
  missing mvn "apt-get install maven (fetches Kafka $kafka_version from Maven Central once)"
fi

echo "Schema registry for just test (Apicurio Registry from Maven Central; Java 21+)"
if registry_java="$(scripts/registry.sh java 2>/dev/null)"; then
  ok "java 21+" "$registry_java"
else
  missing "java >= 21" "a JDK 21 or newer under /usr/lib/jvm, or REGISTRY_JAVA=/path/to/java"
fi

echo "PostgreSQL (scripts/postgres.sh runs Debian's server binaries)"
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  ok postgresql "$(ls -d /usr/lib/postgresql/*/ | head -n 1)"
else
  missing postgresql "apt-get install postgresql"
fi

echo "JavaScript email service, browser test, container linters"
if have node; then ok node "$(node --version)"; else missing node "apt-get install nodejs npm"; fi
if have npm; then ok npm "$(npm --version)"; else missing npm "apt-get install npm"; fi
if have chromium || have chromium-browser || have google-chrome; then
  ok chromium "$(command -v chromium || command -v chromium-browser || command -v google-chrome)"
else
  missing chromium "apt-get install chromium"
fi

echo "Python (gateway fuzzing and hadolint, in .venv-tools/)"
if have python3 && python3 -c 'import ensurepip, venv' 2>/dev/null; then
  ok "python3 + venv" "$(python3 --version 2>&1)"
else
  missing "python3 + venv" "apt-get install python3-venv"
fi

echo "Container checks in just test (Docker's compose plugin, else compose built from its Go module)"
if have docker && docker compose version >/dev/null 2>&1; then
  ok "docker compose" "$(first_line docker compose version)"
elif compgen -G ".venv-tools/bin/docker-compose-*" >/dev/null; then
  ok "docker compose" "$(compgen -G ".venv-tools/bin/docker-compose-*" | head -n 1) (built before)"
elif have go; then
  ok go "$(go version) (builds docker compose once, ~2 minutes)"
else
  missing "docker or go" "Go 1.26+ from https://go.dev/dl/ (Debian's golang-go is too old), or Docker with its compose plugin"
fi

echo "Recommended"
if have kcat; then ok kcat "$(command -v kcat)"; else
  optional kcat "apt-get install kcat (kafka.sh then waits for the broker's metadata, not just its port)"
fi

echo
if [ "$MISSING" -gt 0 ]; then
  echo "doctor: $MISSING missing; .ci/run installs all of it on Debian (as root)"
  exit 1
fi
echo "doctor: ready for just run and just test (the first build takes ~6 minutes: docs/performance.md)"
