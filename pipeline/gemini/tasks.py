"""Task-aware input: documents and queries embedded the way each model wants them.

- Models that take ``taskType`` (gemini-embedding-001) get RETRIEVAL_DOCUMENT with a ``title``
  for documents and RETRIEVAL_QUERY for queries.
- gemini-embedding-2 ignores ``taskType``: the task goes into the text, as Google's guidance
  says: ``title: {title} | text: {text}`` for documents, ``task: search result | query: {text}``
  for queries (``title: none`` when there is no title).

Templates are the job's to change (``embed.document_template``, ``embed.query_template``); they
apply to text parts only (an image has no text to prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import JobConfig
from pipeline.gemini.client import EmbedRequest
from pipeline.models import model_spec
from pipeline.records import Item, Part

DOCUMENT_TEMPLATE = "title: {title} | text: {text}"
QUERY_TEMPLATE = "task: search result | query: {text}"
MAX_TITLE_CHARS = 120


@dataclass(frozen=True, slots=True)
class TaskStyle:
    document_task: str | None
    query_task: str | None
    document_template: str | None
    query_template: str | None

    @classmethod
    def for_job(cls, job: JobConfig) -> TaskStyle:
        embed = job.embed
        if model_spec(embed.model).uses_task_type:
            return cls(embed.task_type, embed.query_task_type, embed.document_template,
                       embed.query_template)
        return cls(None, None,
                   embed.document_template if embed.document_template is not None
                   else DOCUMENT_TEMPLATE,
                   embed.query_template if embed.query_template is not None else QUERY_TEMPLATE)

    def document(self, item: Item) -> EmbedRequest:
        return self.document_of(item.parts, item.title)

    def document_of(self, parts: tuple[Part, ...], title: str | None) -> EmbedRequest:
        title = (title or "none")[:MAX_TITLE_CHARS]
        parts = tuple(_fill(p, self.document_template, title) for p in parts)
        return EmbedRequest(parts, task_type=self.document_task,
                            title=title if self.document_task == "RETRIEVAL_DOCUMENT" else None)

    def query(self, parts: tuple[Part, ...]) -> EmbedRequest:
        return EmbedRequest(tuple(_fill(p, self.query_template, "none") for p in parts),
                            task_type=self.query_task)


def _fill(part: Part, template: str | None, title: str) -> Part:
    if template is None or part.text is None:
        return part
    return Part(text=template.replace("{title}", title).replace("{text}", part.text))
