"""`yoloscale sweep`: hyperparameter search over ordinary training runs, with Optuna as the search engine.

command.py    the command and its settings; one worker: check, open the study, schedule, write results
space.py      space.yaml -> Optuna distributions, checked against the training configuration
study.py      storage, sampler, pruner; which trials count; who owns a running trial; continuing a lost one
scheduler.py  the node's GPUs as slots, one trial process each; stop with a checkpoint on a signal
trial.py      inside a trial: the per-epoch report to the pruner; after it: what its run directory says
results.py    sweep.csv, best.yaml, Optuna's plots, the status table
slurm.py      `yoloscale launch slurm sweep=space.yaml array=N`: a job array of workers on one study
"""
