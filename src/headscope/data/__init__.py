"""Text to run models on: the default offline corpus (`build_corpus`, `ensure_default_corpus`)
and readers for users' own data (`iter_documents`). See docs/corpus.md."""

from headscope.data.corpus import (
    CorpusStats,
    CorpusTooSmallError,
    Count,
    MissingSourceWarning,
    SourceStats,
    build_corpus,
    default_corpus_path,
    ensure_default_corpus,
    format_stats,
)
from headscope.data.readers import Document, ReadReport, iter_documents
from headscope.data.sources import DOMAINS, SOURCES

__all__ = [
    "DOMAINS",
    "SOURCES",
    "CorpusStats",
    "CorpusTooSmallError",
    "Count",
    "Document",
    "MissingSourceWarning",
    "ReadReport",
    "SourceStats",
    "build_corpus",
    "default_corpus_path",
    "ensure_default_corpus",
    "format_stats",
    "iter_documents",
]
