"""The one trainer every task uses (plain PyTorch loop; DDP through torchrun)."""
