"""Token data: the tokenize step, Megatron indexed datasets and GPT training samples.

* ``mtnlg.data.tokenize.tokenize`` - extracted JSONL -> tokenizer + ``.bin``/``.idx`` files;
* ``mtnlg.data.tokenizer.Tokenizer`` - encode/decode with the trained SentencePiece model;
* ``mtnlg.data.indexed_dataset`` - the Megatron-LM ``MMapIndexedDataset`` format;
* ``mtnlg.data.gpt_dataset`` - shuffled, epoch-repeating, resumable GPT samples and blends.
"""
