"""The horizon experiment (`evertrain sweep`), one file per stage:

plan.py      the grid (horizons x max_lrs x seeds) and the jobs of each cell: train, fork, average
execute.py   run every unfinished job as its own process, resumable; write OUT/results.json
results.py   read the run dirs back: records, the table by best max_lr, regime, compute
tables.py    the results as text (the command's output, docs/horizon_sweep.md's tables)
command.py   the command line
"""
