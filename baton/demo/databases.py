"""Two small SQLite databases for text-to-SQL (``POST /v1/sql``, ``POST /query``).

``inventory``: the seed's workspace inventory (virtual desktops, their bundles and
directories). ``shop``: customers, products and orders, a different shape with a
many-to-many join. The rows are fixed, so a question's right answer never changes.

Run ``python -m baton.demo.databases DIR`` to write ``DIR/inventory.db`` and
``DIR/shop.db``; the native launcher does it under ``.run/`` and names them in
``GEMMA_SQL_DATABASES``.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import sys
from pathlib import Path

INVENTORY_DDL = """
CREATE TABLE directories (
    directory_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    region TEXT NOT NULL
);
CREATE TABLE bundles (
    bundle_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    compute_type TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_gb INTEGER NOT NULL,
    monthly_cost REAL NOT NULL
);
CREATE TABLE workspaces (
    workspace_id TEXT PRIMARY KEY,
    user_name TEXT NOT NULL,
    state TEXT NOT NULL,
    running_mode TEXT NOT NULL,
    bundle_id TEXT NOT NULL REFERENCES bundles (bundle_id),
    directory_id TEXT NOT NULL REFERENCES directories (directory_id),
    created_at TEXT NOT NULL
);
"""

SHOP_DDL = """
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    city TEXT NOT NULL,
    joined_on TEXT NOT NULL
);
CREATE TABLE products (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    category TEXT NOT NULL,
    price REAL NOT NULL
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers (id),
    ordered_on TEXT NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE order_items (
    order_id INTEGER NOT NULL REFERENCES orders (id),
    product_id INTEGER NOT NULL REFERENCES products (id),
    quantity INTEGER NOT NULL
);
"""

_DIRECTORIES = [
    ("d-east", "corp-east", "us-east-1"),
    ("d-west", "corp-west", "us-west-2"),
    ("d-eu", "corp-eu", "eu-west-1"),
]
_BUNDLES = [
    ("b-value", "Value", "VALUE", 1, 2, 21.0),
    ("b-standard", "Standard", "STANDARD", 2, 4, 35.0),
    ("b-performance", "Performance", "PERFORMANCE", 2, 8, 48.0),
    ("b-power", "Power", "POWER", 4, 16, 78.0),
    ("b-graphics", "Graphics", "GRAPHICS", 8, 32, 250.0),
]
_USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "niaj"]
_STATES = ["AVAILABLE", "AVAILABLE", "STOPPED", "AVAILABLE", "PENDING", "STOPPED", "ERROR", "AVAILABLE"]
_MODES = ["AUTO_STOP", "ALWAYS_ON", "AUTO_STOP"]

_CUSTOMERS = [
    ("Ada", "Oslo", "2024-01-15"),
    ("Ben", "Lisbon", "2024-03-02"),
    ("Chloe", "Oslo", "2024-06-20"),
    ("Dmitri", "Berlin", "2025-01-08"),
    ("Eva", "Lisbon", "2025-02-11"),
    ("Farid", "Berlin", "2025-05-30"),
    ("Greta", "Madrid", "2025-09-14"),
]
_PRODUCTS = [
    ("Kettle", "kitchen", 39.0),
    ("Toaster", "kitchen", 25.5),
    ("Desk lamp", "office", 18.0),
    ("Notebook", "office", 3.5),
    ("Headphones", "audio", 89.0),
    ("Speaker", "audio", 120.0),
    ("Chair", "office", 149.0),
]
_ORDER_STATUSES = ["shipped", "delivered", "pending", "cancelled", "delivered", "shipped"]


def _inventory_rows(db: sqlite3.Connection) -> None:
    db.executemany("INSERT INTO directories VALUES (?, ?, ?)", _DIRECTORIES)
    db.executemany("INSERT INTO bundles VALUES (?, ?, ?, ?, ?, ?)", _BUNDLES)
    rows = []
    for n in range(40):
        bundle = _BUNDLES[(n * 3) % len(_BUNDLES)][0]
        directory = _DIRECTORIES[n % len(_DIRECTORIES)][0]
        user = _USERS[n % len(_USERS)]
        created = (dt.date(2025, 1, 3) + dt.timedelta(days=9 * n)).isoformat()
        rows.append(
            (f"ws-{n:04d}", user, _STATES[n % len(_STATES)], _MODES[n % len(_MODES)], bundle, directory, created)
        )
    db.executemany("INSERT INTO workspaces VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


def _shop_rows(db: sqlite3.Connection) -> None:
    db.executemany("INSERT INTO customers (name, city, joined_on) VALUES (?, ?, ?)", _CUSTOMERS)
    db.executemany("INSERT INTO products (name, category, price) VALUES (?, ?, ?)", _PRODUCTS)
    items = []
    for n in range(1, 25):
        customer = 1 + (n * 5) % len(_CUSTOMERS)
        ordered = (dt.date(2026, 1, 2) + dt.timedelta(days=11 * n)).isoformat()
        db.execute(
            "INSERT INTO orders (id, customer_id, ordered_on, status) VALUES (?, ?, ?, ?)",
            (n, customer, ordered, _ORDER_STATUSES[n % len(_ORDER_STATUSES)]),
        )
        for k in range(1 + n % 3):
            items.append((n, 1 + (n + k * 3) % len(_PRODUCTS), 1 + (n + k) % 4))
    db.executemany("INSERT INTO order_items VALUES (?, ?, ?)", items)


DATABASES = {"inventory": (INVENTORY_DDL, _inventory_rows), "shop": (SHOP_DDL, _shop_rows)}


def build(folder: Path) -> dict[str, Path]:
    """Writes every database into ``folder`` afresh; returns name → file."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, (ddl, fill) in DATABASES.items():
        path = folder / f"{name}.db"
        partial = path.with_suffix(".db.partial")
        partial.unlink(missing_ok=True)
        db = sqlite3.connect(partial)
        try:
            db.executescript(ddl)
            fill(db)
            db.commit()
        finally:
            db.close()
        partial.replace(path)
        made[name] = path
    return made


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m baton.demo.databases DIR\n")
        return 2
    for name, path in build(Path(argv[0])).items():
        sys.stdout.write(f"{name}: {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
