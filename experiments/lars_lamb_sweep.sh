#!/bin/bash
# Regime A with LAMB, then with LARS (experiments/README.md, "LARS and LAMB at equal rate and equal steps"):
# each the rate phase on seed 0, then the gap and the noise arms seed by seed; one run at a time, one thread.
# Resumable: each command skips the runs already in its results file, so the same command continues it.
# From the repository root, with CIFAR-10 in $TF_GRADMIX_DATA (PYTHON: the interpreter, default python):
#
#   setsid nohup nice -n 19 experiments/lars_lamb_sweep.sh > runs/lars_lamb_sweep.log 2>&1 &
#
# A command that stops (no rate fits, a failed run) does not stop the next one.
# LARS's grid was 0.3 1 3 10 when the sweep first ran; no rate fitted (batch 32 reached 71.4, 98.3, 10.1 and
# 10.0% training accuracy at seed 0), so 0.5 0.7 1.5 2 were added and the command run again: it found the first
# four rates' runs recorded and chose 0.7. The grids below are the ones that produced the results files.
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python}
ARMS=(--lazy-gd --noises gaussian bernoulli isotropic --seed-major --threads 1 --parallel 1)
LAMB_RATES=(1e-4 3e-4 1e-3 3e-3)
LARS_RATES=(0.3 0.5 0.7 1 1.5 2 3 10)
echo "[$(date -u +%FT%TZ)] LAMB"
"$PYTHON" -m experiments.temperature --optimizer lamb --rates "${LAMB_RATES[@]}" "${ARMS[@]}"
echo "[$(date -u +%FT%TZ)] LAMB: exit status $?; LARS"
"$PYTHON" -m experiments.temperature --optimizer lars --rates "${LARS_RATES[@]}" "${ARMS[@]}"
echo "[$(date -u +%FT%TZ)] LARS: exit status $?"
# The one more arm: GD + Gaussian at the stddev matching the small batch's noise-to-signal ratio after the trust
# ratio (temperature.py --phase matched), for each optimizer at its chosen rate. Run again, it measures again
# (a few CPU-minutes) before it finds its runs recorded.
"$PYTHON" -m experiments.temperature --optimizer lamb --rates "${LAMB_RATES[@]}" --phase matched "${ARMS[@]}"
echo "[$(date -u +%FT%TZ)] lamb matched: exit status $?"
"$PYTHON" -m experiments.temperature --optimizer lars --rates "${LARS_RATES[@]}" --phase matched "${ARMS[@]}"
echo "[$(date -u +%FT%TZ)] lars matched: exit status $?"
