#!/usr/bin/env bash
# Reads a published version with the AWS CLI (an S3 client independent of
# earshot's) and checks every file's size and SHA-256 against the manifest.
#   scripts/awscli-check.sh ENDPOINT BUCKET NAME VERSION
# Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. The test
# suite runs it (registry-sync/tests/awscli.rs).
set -euo pipefail
endpoint=$1 bucket=$2 name=$3 version=$4
root=$(cd "$(dirname "$0")/.." && pwd)
aws=${AWS_CLI:-$root/.venv/bin/aws}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/config" <<CFG
[default]
region = us-east-1
s3 =
    addressing_style = path
CFG
export AWS_CONFIG_FILE="$work/config" AWS_SHARED_CREDENTIALS_FILE=/dev/null
prefix="s3://$bucket/models/$name/$version"

echo "listing $prefix/ with $("$aws" --version 2>&1 | cut -d' ' -f1)"
"$aws" --endpoint-url "$endpoint" s3 ls "$prefix/"
mkdir "$work/files"
"$aws" --endpoint-url "$endpoint" s3 cp --recursive --only-show-errors "$prefix/" "$work/files/"

python3 - "$work/files" <<'PY'
import hashlib, json, os, sys
d = sys.argv[1]
m = json.load(open(os.path.join(d, "manifest.json")))
bad = 0
for f in m["files"]:
    p = os.path.join(d, *f["path"].split("/"))
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    ok = h.hexdigest() == f["sha256"] and os.path.getsize(p) == f["size"]
    bad += not ok
    print(("ok      " if ok else "MISMATCH"), f["path"], f["size"], h.hexdigest())
if bad:
    sys.exit(f"{bad} files do not match the manifest")
print(f"{m['name']}@{m['version']}: all {len(m['files'])} files match the manifest")
PY
