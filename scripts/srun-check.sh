#!/usr/bin/env bash
# `srun vit train` on a one-node Slurm cluster made on this machine (issue 12 item 2): starts
# munge, slurmctld and slurmd (Debian: slurm-wlm munge; installed here with --install, as
# root), then trains the small recipe of crates/experiments/tests/mpi_train.rs once in one
# process and once as `srun -n 2 --mpi=pmix` (two MPI ranks bootstrapped by Slurm's PMIx), and
# compares the losses step by step (the data-parallel tests' 1e-5 relative).
#
#   scripts/srun-check.sh [--install] [--ranks N]   (N divides the batch, 64; default 2)
#
# Needs a `vit` built with the MPI feature (cargo build -p vit-experiments --features mpi;
# VIT=path to use another). Leaves the daemons running; `pkill slurmd; pkill slurmctld` stops
# them. Not part of CI: a developer check of the Slurm launch path, recorded in
# docs/distributed.md.
set -euo pipefail
cd "$(dirname "$0")/.."
install=0
ranks=2
while [ $# -gt 0 ]; do
  case $1 in
    --install) install=1 ;;
    --ranks) ranks=$2; shift ;;
    *) echo "srun-check.sh: unknown argument $1 (expected --install or --ranks N)" >&2; exit 2 ;;
  esac
  shift
done
vit=${VIT:-target/debug/vit}
if ! nm -D "$vit" 2>/dev/null | grep -c MPI_Init >/dev/null; then
  echo "srun-check.sh: $vit is not built with MPI: cargo build -p vit-experiments --features mpi" >&2
  exit 1
fi
if [ $install = 1 ] && ! command -v slurmd >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi
command -v srun >/dev/null || { echo "srun-check.sh: no Slurm here (--install installs slurm-wlm and munge)" >&2; exit 1; }

# munge: a key and the daemon.
mkdir -p /etc/munge /var/log/munge /run/munge /var/lib/munge
[ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

# Slurm: one node (this host, all its cores), one partition that may oversubscribe.
host=$(hostname -s)
cpus=$(nproc)
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
if ! pgrep -x slurmctld >/dev/null; then
  cat >/etc/slurm/slurm.conf <<EOF
ClusterName=vitrs
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  slurmctld
  slurmd
  sleep 3
fi
sinfo

# The small recipe (crates/experiments/tests/common: small_recipe(12, 6)).
args=()
for s in model.width=32 model.depth=2 model.mlp_dim=64 data.train_limit=1024 data.test_limit=128 \
  train.batch_size=64 train.steps=12 schedule.warmup_steps=3 train.eval_every=6 \
  train.checkpoint_every=6 train.log_every=1; do
  args+=(--set "$s")
done
out=$(mktemp -d)
export RAYON_NUM_THREADS=1
"$vit" train --out "$out/one" "${args[@]}" >"$out/one.log" 2>&1
srun -N 1 -n "$ranks" --overcommit --mpi=pmix "$vit" train --out "$out/srun" "${args[@]}" >"$out/srun.log" 2>&1
head -1 "$out/srun.log"
python3 - "$out/one/metrics.jsonl" "$out/srun/metrics.jsonl" <<'EOF'
import json, sys
one, srun = ([json.loads(l) for l in open(p)] for p in sys.argv[1:])
assert len(one) == len(srun) == 12, (len(one), len(srun))
rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, srun))
print(f"srun-check: 12 steps, srun follows one process within {rel:.2e} relative (bound 1e-5)")
sys.exit(0 if rel <= 1e-5 else 1)
EOF
rm -rf "$out"
