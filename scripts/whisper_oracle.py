#!/usr/bin/env python3
"""The reference Whisper that earshot's tests compare against: CTranslate2
(faster-whisper's engine) on the same weights, reading requests as JSON on
stdin and writing one JSON answer to stdout. Test-only; never run by a node.

Request:
  {"ct2_dir": DIR, "threads": 2,
   "mel": {"path": F32LE_FILE, "n_mels": 80, "frames": 3000},   (optional)
   "decode": [{"prompt": [ids], "suppress": [ids]}, ...],        (needs mel)
   "align": [{"start": [ids], "text": [ids], "num_frames": N}],  (needs mel)
   "detect_wavs": [WAV, ...],        (faster-whisper's detect_language per file)
   "encoder_out": OUT_F32LE_FILE}    (optional: write the encoder output)
Answer:
  {"encoder_shape": [...], "tokens": [[ids], ...],
   "alignments": [[[token, position], ...], ...] (CTranslate2's align),
   "languages": [[code, prob] (on the given mel)],
   "detected": [[code, prob], ...] (per wav, faster-whisper)}
"""
import json
import os
import sys

req = json.load(sys.stdin)
threads = int(req.get("threads", 2))
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(threads)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import ctranslate2  # noqa: E402

out = {}
model = ctranslate2.models.Whisper(req["ct2_dir"], device="cpu", compute_type="float32",
                                   intra_threads=threads)
if "mel" in req:
    m = req["mel"]
    mel = np.fromfile(m["path"], dtype="<f4").reshape(1, m["n_mels"], m["frames"])
    enc = model.encode(ctranslate2.StorageView.from_array(mel), to_cpu=False)
    if req.get("encoder_out"):
        arr = np.array(model.encode(ctranslate2.StorageView.from_array(mel), to_cpu=True))
        arr.astype("<f4").tofile(req["encoder_out"])
        out["encoder_shape"] = list(arr.shape)
    out["tokens"] = []
    for d in req.get("decode", []):
        res = model.generate(enc, [d["prompt"]], beam_size=1, max_length=448,
                             suppress_blank=True, suppress_tokens=d["suppress"])
        out["tokens"].append([int(t) for t in res[0].sequences_ids[0]])
    out["alignments"] = []
    for a in req.get("align", []):
        res = model.align(enc, a["start"], [a["text"]], a["num_frames"])
        out["alignments"].append([[int(i), int(j)] for i, j in res[0].alignments])
    if model.is_multilingual:
        out["languages"] = [[c[2:-2], float(p)] for c, p in model.detect_language(enc)[0][:3]]

if req.get("detect_wavs"):
    from faster_whisper import WhisperModel
    import wave

    fw = WhisperModel(req["ct2_dir"], device="cpu", compute_type="float32",
                      cpu_threads=threads, num_workers=1)
    detected = []
    for path in req["detect_wavs"]:
        with wave.open(path, "rb") as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        audio = pcm.astype(np.float32) / 32768.0
        lang, prob, _ = fw.detect_language(audio)
        detected.append([lang, float(prob)])
    out["detected"] = detected

json.dump(out, sys.stdout)
