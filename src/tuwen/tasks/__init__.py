"""Tasks: text2image, captioning (image/video→text), clip, rerank. Each: model wrapper, training task, predict."""
