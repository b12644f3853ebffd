#!/bin/sh
# Train the three shipped tiny models one after another on one thread (2 OpenMP threads stall badly on a shared, oversubscribed CPU) (~14 min each).
set -e
cd "$(dirname "$0")/.."
for name in tiny-mixtral tiny-lpr tiny-deepseek; do
    python tools/train_tiny.py "$name" --minutes "${MINUTES:-14}" --threads "${THREADS:-1}" --batch 8 --lr 2e-3 \
        > "tools/logs/train_$name.log" 2>&1
done
