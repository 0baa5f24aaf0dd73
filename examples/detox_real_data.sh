#!/usr/bin/env bash
# Detoxify a GPT on real text with an oracle trained from a labelled file you point to.
#
#   bash examples/detox_real_data.sh DATA_DIR [RUN_DIR]      # ~15-20 min on 2 CPU cores
#
# DATA_DIR holds wikitext-2/{valid,test}.txt, toxigen_seeds/{hate,neutral}_<group>.txt and
# davidson_hate_offensive/labeled_data.csv (see docs/example.md). Steps:
#  1. a corpus (JSONL, one domain per source): WikiText-2 paragraphs (domain wiki) and 80% of
#     the ToxiGen statements of both labels (domain toxigen); prompts: the first 4 words of the
#     other 20%; held-out text for perplexity: WikiText-2 test;
#  2. acft-train: the built-in tiny GPT pre-trained on that corpus, then the plain fine-tune and
#     ACFT with the sklearn_text oracle (TF-IDF + logistic regression) trained on the Davidson
#     tweets (class 2 "neither" satisfies, hate and offensive violate), λ on toxigen only;
#  3. acft-eval of both models on the held-out prompts (25 samples each) and a comparison table.
set -euo pipefail
DATA=${1:?usage: examples/detox_real_data.sh DATA_DIR [RUN_DIR]}
RUN=${2:-runs/example}
PY=${ACFT_PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
for f in wikitext-2/valid.txt wikitext-2/test.txt toxigen_seeds davidson_hate_offensive/labeled_data.csv; do
  [ -e "$DATA/$f" ] || { echo "examples/detox_real_data.sh: $DATA/$f does not exist" >&2; exit 2; }
done
mkdir -p "$RUN/data"

# 1. the corpus, the prompts and the held-out text (seeded split; nothing copied elsewhere)
"$PY" - "$DATA" "$RUN/data" <<'PY'
import json, random, sys
from pathlib import Path
data, out = Path(sys.argv[1]), Path(sys.argv[2])
rng = random.Random(0)
wiki = [l.strip() for l in (data / "wikitext-2/valid.txt").read_text().splitlines()
        if len(l.split()) >= 8 and not l.strip().startswith("=")][:3000]
train, prompts = [], []
for f in sorted((data / "toxigen_seeds").glob("*_*.txt")):
    lines = [l.strip() for l in f.read_text().splitlines() if l.strip()]
    rng.shuffle(lines)
    cut = int(0.8 * len(lines))
    train += lines[:cut]
    prompts += [" ".join(l.split()[:4]) for l in lines[cut:] if len(l.split()) > 5]
reps = max(1, len(wiki) // max(1, len(train)))  # as many toxigen records as wiki ones
records = [{"text": t, "domain": "wiki"} for t in wiki] + \
          [{"text": t, "domain": "toxigen"} for t in train] * reps
rng.shuffle(records)
(out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
(out / "prompts.txt").write_text("\n".join(prompts) + "\n")
test = [l.strip() for l in (data / "wikitext-2/test.txt").read_text().splitlines()
        if len(l.split()) >= 8 and not l.strip().startswith("=")][:1000]
(out / "heldout.txt").write_text("\n".join(test) + "\n")
print(f"corpus: {len(wiki)} wiki + {len(train)} x {reps} toxigen records; "
      f"{len(prompts)} prompts; {len(test)} held-out paragraphs")
PY

# 2. train: the plain fine-tune and ACFT (the run directory resumes if rerun)
"$BIN/acft-train" run_dir="$RUN" data.source=files data.train_file="$RUN/data/train.jsonl" \
  data.heldout_file="$RUN/data/heldout.txt" data.prompts_file="$RUN/data/prompts.txt" \
  oracle.name=sklearn_text +oracle.path="$DATA/davidson_hate_offensive/labeled_data.csv" \
  +oracle.format=csv +oracle.text_column=tweet +oracle.label_column=class \
  '+oracle.satisfying_labels=["2"]' '~model.acft.domain_lambdas' '+model.acft.domain_lambdas={toxigen:4.0,wiki:0.0}' \
  model.acft.iterations=3 pretrain.steps=1000 pretrain.tokenizer.vocab_size=4096 \
  pretrain.model.encoder_seq_length=48 pretrain.model.make_vocab_size_divisible_by=128 \
  eval.prompts=200 progress=false

# 3. evaluate both on the held-out prompts with the toxicity protocol, then one table
for m in baseline:baseline exchange:acft; do  # store:name (ACFT's models are in its exchange)
  "$BIN/acft-eval" --run-dir "$RUN" --store "${m%%:*}" --out "$RUN/eval/${m##*:}" \
    --method "${m##*:}" --prompts "$RUN/data/prompts.txt" --samples-per-prompt 25
done
"$BIN/acft-eval" --compare "$RUN/eval/baseline" "$RUN/eval/acft" --out "$RUN/eval/compare"
