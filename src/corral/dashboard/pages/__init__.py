"""The dashboard's pages, one module per page (and its partials): each exposes `<name>_pages(dash) -> APIRouter`,
included by dashboard/app.py."""
