#!/usr/bin/env bash
# Installs what earshot needs to build, test and run its demo on Debian, as
# root. Idempotent: every step checks first and does nothing when done.
#   - Debian packages: redis-server, espeak-ng, sox, python3 with venv
#   - .venv: the onnxruntime and silero-vad wheels (ONNX Runtime's library
#     and the Silero VAD model come from there), and awscli (a second S3
#     client the registry's tests read the registry with)
#   - .cache/models/whisper-test: the generated test Whisper model
set -euo pipefail
cd "$(dirname "$0")/.."

ONNXRUNTIME_VERSION=1.31.1
SILERO_VAD_VERSION=6.2.3
RUST_MIN=1.95

say() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v sox >/dev/null || missing+=(sox)
command -v python3 >/dev/null || missing+=(python3)
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
command -v cc >/dev/null || missing+=(build-essential)
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    say "missing packages: ${missing[*]}; run as root or install them with apt-get"
    exit 1
  fi
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" ca-certificates >/dev/null
fi

# 2. Rust (rustup's installer is the only supported way; Debian's rustc is too old).
if ! command -v cargo >/dev/null; then
  say "cargo not found: install Rust >= $RUST_MIN with rustup (https://rustup.rs) and re-run"
  exit 1
fi
have=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$RUST_MIN" "$have" | sort -V | head -n1)" != "$RUST_MIN" ]; then
  say "rustc $have is older than $RUST_MIN: run 'rustup update'"
  exit 1
fi

# 3. Python wheels in a local virtualenv.
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import importlib.metadata as m; assert m.version('onnxruntime') == '$ONNXRUNTIME_VERSION'" 2>/dev/null; then
  say "installing onnxruntime==$ONNXRUNTIME_VERSION"
  .venv/bin/pip install -q --disable-pip-version-check "onnxruntime==$ONNXRUNTIME_VERSION"
fi
if ! .venv/bin/python -c "import importlib.metadata as m; assert m.version('silero-vad') == '$SILERO_VAD_VERSION'" 2>/dev/null; then
  say "installing silero-vad==$SILERO_VAD_VERSION (model only, --no-deps)"
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "silero-vad==$SILERO_VAD_VERSION"
fi

if [ ! -x .venv/bin/aws ]; then
  say "installing awscli (an independent S3 client for the registry's tests)"
  .venv/bin/pip install -q --disable-pip-version-check awscli
fi

# 4. The generated test model (seeded: the same bytes every time).
if [ ! -f .cache/models/whisper-test/model.safetensors ]; then
  say "generating the test Whisper model"
  cargo run -q --bin earshot -- models generate-whisper --out .cache/models/whisper-test
fi
say "ok"
