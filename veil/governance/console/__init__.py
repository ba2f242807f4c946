"""The data owner's web console (issue #16): Starlette app served by the worker on its own port.

Why this stack: Starlette (ASGI, small, well kept) under uvicorn, Jinja2 templates
and a few lines of plain JavaScript: no build step, nothing fetched at run time, and
every page renders without JavaScript.
"""
