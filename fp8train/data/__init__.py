"""Data: memory-mapped token files, tokenizers, the prepare step, the default corpus, sampling.

    from fp8train.data import ensure_default_corpus, TokenFile, TrainBatches, ValBatches
    dataset_dir = ensure_default_corpus()                 # stdlib sources, byte-tokenized, cached
    train = TrainBatches(TokenFile(dataset_dir, "train"), seq_len=512, micro_batch_size=8,
                         grad_accum_steps=4, rank=rank, world_size=world_size, seed=0)
    input_ids, labels = train.get(step, micro_step)       # int64 [8, 512] each

Module map: token_file (format, TokenFile, writers), tokenizer (byte / BPE), builder
(prepare_dataset), prepare (CLI), default_corpus, sampler (TrainBatches, ValBatches),
stats (unigram_entropy).
"""

from fp8train.data.builder import prepare_dataset
from fp8train.data.default_corpus import ensure_default_corpus
from fp8train.data.sampler import TrainBatches, ValBatches
from fp8train.data.stats import unigram_entropy
from fp8train.data.token_file import TokenFile
from fp8train.data.tokenizer import BpeTokenizer, ByteTokenizer, load_tokenizer

__all__ = ["TokenFile", "ByteTokenizer", "BpeTokenizer", "load_tokenizer", "prepare_dataset",
           "ensure_default_corpus", "TrainBatches", "ValBatches", "unigram_entropy"]
