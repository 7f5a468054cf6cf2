"""The command-line tools, one job each; a package so that one tool can run another's ``main`` in process
(learncheck runs the trainer's and the evaluator's) and tests can import them, without ``sys.path`` edits."""
