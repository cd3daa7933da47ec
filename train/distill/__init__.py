"""Knowledge distillation: a student run trained on a frozen teacher run's softened outputs
(loss.py: the loss; teacher.py: the teacher, resolved and restored onto the student's mesh)."""
