"""Training: `lstm-lm train` from the config to the run directory.

train.py           train(cfg, out): the run's set-up, the lock, the logs, one or many processes
trainer.py         Trainer: the data, model, optimizer, learning rate and the loop over steps
training_state.py  what a resumable checkpoint holds beyond the weights (optimizer, RNG, streams)
optim.py           the optimizers, the learning-rate schedules, NT-ASGD's weight average
rundir.py          the run directory: what is ours in it, its checkpoints and the runs/latest pointer
runlock.py         one training process per run directory
runlogs.py         steps.jsonl, metrics.jsonl, grad_flow.jsonl and TensorBoard
clock.py           the time budget
signals.py         Ctrl-C and SIGTERM: save, then stop
distributed.py     torchrun: ranks, their share of the data, a lost process
"""
