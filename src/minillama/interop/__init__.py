"""Moving weights between Mini Llama and other Llama implementations (Hugging Face transformers, llama2.c)."""
