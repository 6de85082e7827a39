"""VM factories: templates that clones restore from (see :mod:`.template`)."""

from virtcontainers.factory.template import DEFAULT_TEMPLATE_ROOT, Template

__all__ = ["DEFAULT_TEMPLATE_ROOT", "Template"]
