"""Model definitions: the GPT (text→image codes and captioning), VQGAN, encoders."""
