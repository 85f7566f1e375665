"""Data layer shared by every task: EasyNLP TSV tables, image folders, code shards, the synthetic set."""
