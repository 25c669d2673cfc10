#!/usr/bin/env bash
# Run launch/train.py on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh --tpu=my-v5p-64 --zone=us-east5-a \
#       --workdir=gs://my-bucket/runs/grpo1 --config=configs/quickstart.py \
#       [--config.trainer.num_steps=500 ...] [-- more train.py flags]
#
# Setup (skipped with --skip_setup): the code reaches every worker by copying
# this checkout (default) or by `git clone --repo=URL [--ref=REF]`, then
# `pip install -e '.[tpu]'` runs on each worker. Then the same command runs on
# all workers at once (`gcloud compute tpus tpu-vm ssh --worker=all`); every
# worker is one JAX process and `--distributed=on` makes launch/train.py call
# jax.distributed.initialize(), which reads the pod topology from the TPU
# metadata. The workdir must be on GCS: checkpoints, metrics and the prepared
# dataset live there and every worker reads and writes it.
#
# Ctrl-C stops the local ssh, which stops the run; use --detach for long runs
# (logs in <remote_dir>/train.log on each worker). A rerun with the same
# --workdir resumes from the latest checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --tpu=NAME --zone=ZONE --workdir=gs://BUCKET/PATH --config=FILE[:ARG]
                         [options] [--config.FIELD=VALUE ...] [-- TRAIN_FLAGS ...]

Runs launch/train.py on every worker of a Cloud TPU VM pod slice.

required:
  --tpu=NAME           TPU VM name (default: $TPU)
  --zone=ZONE          its zone (default: $ZONE)
  --workdir=gs://...   run directory on GCS (checkpoints, metrics, data)
  --config=FILE[:ARG]  config file, relative to the repository root
options:
  --project=PROJECT    GCP project (default: gcloud's configured project)
  --repo=URL           git clone URL used on the workers (default: copy this checkout)
  --ref=REF            branch, tag or commit to check out with --repo (default: the default branch)
  --remote_dir=DIR     code directory on the workers (default: jaxrl_llm, in the home directory)
  --python=PYTHON      Python on the workers (default: python3)
  --skip_setup         do not copy / clone or pip install (a rerun on a prepared pod)
  --setup_only         only copy / clone and pip install
  --detach             run under nohup and return; logs in <remote_dir>/train.log per worker
  --dry_run            print the gcloud commands instead of running them
  -h, --help           this text
Any --config.FIELD=VALUE flag, and everything after --, goes to launch/train.py.
EOF
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  echo "run 'launch/tpu_pod.sh --help' for usage" >&2
  exit 2
}

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tpu="${TPU:-}"
zone="${ZONE:-}"
project=""
workdir=""
config=""
repo=""
ref=""
remote_dir="jaxrl_llm"
python="python3"
setup=1
train=1
detach=0
dry_run=0
train_flags=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --config.*=*) train_flags+=("$1") ;;
    --repo=*) repo="${1#*=}" ;;
    --ref=*) ref="${1#*=}" ;;
    --remote_dir=*) remote_dir="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --skip_setup) setup=0 ;;
    --setup_only) train=0 ;;
    --detach) detach=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; train_flags+=("$@"); break ;;
    *) die "unknown argument '$1' (flags for launch/train.py go after --)" ;;
  esac
  shift
done

[[ -n "$tpu" ]] || die "--tpu=NAME is required (or set \$TPU)"
[[ -n "$zone" ]] || die "--zone=ZONE is required (or set \$ZONE)"
[[ "$setup" == 1 || "$train" == 1 ]] || die "--skip_setup and --setup_only leave nothing to do"
[[ -n "$ref" && -z "$repo" ]] && die "--ref needs --repo (a copied checkout has no ref)"
if [[ "$train" == 1 ]]; then
  [[ -n "$workdir" ]] || die "--workdir=gs://BUCKET/PATH is required"
  [[ "$workdir" == gs://?* ]] || die "--workdir must be a gs:// path that every worker can reach, got '$workdir'"
  [[ -n "$config" ]] || die "--config=FILE is required"
  if [[ -z "$repo" && ! -f "$ROOT/${config%%:*}" ]]; then
    die "config file '${config%%:*}' not found in $ROOT (give it relative to the repository root)"
  fi
fi
command -v gcloud >/dev/null 2>&1 || [[ "$dry_run" == 1 ]] || die "gcloud is not installed"

gcloud_args=(--zone="$zone")
[[ -n "$project" ]] && gcloud_args+=(--project="$project")

run() {  # run (or with --dry_run print) a command
  if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

on_all_workers() {  # run a shell command on every worker
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=all --command="$1"
}

q_dir="$(printf '%q' "$remote_dir")"

# SETUP: the code on every worker, installed with the TPU extra.
if [[ "$setup" == 1 ]]; then
  if [[ -n "$repo" ]]; then
    # Clone once, then check out exactly REF (a branch, tag or commit; default the
    # remote's default branch) on every run, so that all workers run the same code.
    fetch="{ [ -d $q_dir/.git ] || git clone --quiet $(printf '%q' "$repo") $q_dir; }"
    fetch+=" && git -C $q_dir fetch --quiet origin $(printf '%q' "${ref:-HEAD}")"
    fetch+=" && git -C $q_dir checkout --quiet --detach FETCH_HEAD"
  else
    archive="$(mktemp "${TMPDIR:-/tmp}/jaxrl_llm_XXXXXX").tgz"
    trap 'rm -f "$archive"' EXIT
    run tar -C "$ROOT" -czf "$archive" --exclude=.git --exclude='*.egg-info' \
      --exclude=__pycache__ --exclude=.venv --exclude=.pytest_cache .
    run gcloud compute tpus tpu-vm scp "$archive" "$tpu:/tmp/jaxrl_llm_code.tgz" \
      "${gcloud_args[@]}" --worker=all
    fetch="mkdir -p $q_dir && tar -xzf /tmp/jaxrl_llm_code.tgz -C $q_dir && rm -f /tmp/jaxrl_llm_code.tgz"
  fi
  on_all_workers "set -e; $fetch; cd $q_dir && $(printf '%q' "$python") -m pip install --quiet -e '.[tpu]'"
fi

# TRAIN: the same command on every worker; each is one process of the run.
if [[ "$train" == 1 ]]; then
  cmd=("$python" launch/train.py "--config=$config" "--workdir=$workdir" --distributed=on
       "${train_flags[@]}")
  cmd_str="$(printf '%q ' "${cmd[@]}")"
  if [[ "$detach" == 1 ]]; then
    on_all_workers "cd $q_dir && nohup $cmd_str > train.log 2>&1 < /dev/null & echo \"\$(hostname): started, log in $q_dir/train.log\""
  else
    on_all_workers "cd $q_dir && $cmd_str"
  fi
fi
