"""Test-only: the official `openai` Python client against an edge's
/v1/audio endpoints. Prints one JSON line per call, for
cli/tests/pipeline.rs to check.

usage: openai_check.py BASE_URL WAV NOT_AUDIO
"""
import json
import sys

import openai

base, wav, not_audio = sys.argv[1:4]
client = openai.OpenAI(base_url=base, api_key="not-needed", max_retries=0, timeout=120)


def show(kind, fmt, result):
    out = {"call": kind, "format": fmt}
    if isinstance(result, str):
        out["body"] = result
    else:
        out["text"] = result.text
        for field in ("language", "duration"):
            if getattr(result, field, None) is not None:
                out[field] = getattr(result, field)
        segments = getattr(result, "segments", None) or []
        out["segments"] = [[s.start, s.end, s.text] for s in segments]
        words = getattr(result, "words", None) or []
        out["words"] = [[w.start, w.end, w.word] for w in words]
    print(json.dumps(out), flush=True)


for fmt in ("json", "text", "verbose_json", "srt", "vtt"):
    with open(wav, "rb") as f:
        show("transcriptions", fmt, client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format=fmt, language="en"))
with open(wav, "rb") as f:
    show("transcriptions", "verbose_json+words", client.audio.transcriptions.create(
        model="whisper-1", file=f, response_format="verbose_json",
        timestamp_granularities=["word", "segment"]))
with open(wav, "rb") as f:
    show("translations", "json", client.audio.translations.create(model="whisper-1", file=f))

try:
    with open(not_audio, "rb") as f:
        client.audio.transcriptions.create(model="whisper-1", file=f)
    print(json.dumps({"call": "not_audio", "status": 200}))
except openai.APIStatusError as e:
    body = e.body if isinstance(e.body, dict) else {}
    print(json.dumps({"call": "not_audio", "status": e.status_code,
                      "code": body.get("code"), "type": body.get("type"),
                      "message": body.get("message")}))
