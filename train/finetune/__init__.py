"""Fine-tuning: a backbone run (or Hugging Face directory) restored under a task head
(backbone.py), the task metrics and per-example predictions (predict.py), and the keep-best /
early-stopping rule on the task's metric (selection.py). The modes are optimizer transforms
(train/layerwise.py); the tasks' records and rows are data/tasks.py's."""
