"""The flywheel without torch: labelled export, the model store and the promotion gate (capture is in service/)."""
