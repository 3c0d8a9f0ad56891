-- Stock buckets (core/buckets.py): a sale's stock split over N Redis ledgers, fixed at creation.
ALTER TABLE sales
    ADD COLUMN stock_buckets integer NOT NULL DEFAULT 1
        CHECK (stock_buckets BETWEEN 1 AND 64);
