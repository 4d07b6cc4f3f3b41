//! The embedded store's schema, as numbered migrations. A released
//! migration never changes: a change to the schema is a new entry.

/// Versioned schema changes, applied in order, each exactly once (recorded
/// in `schema_migrations` in the same transaction).
pub(super) const MIGRATIONS: &[(u32, &str, &str)] = &[
    (
        1,
        "initial schema",
        "CREATE TABLE IF NOT EXISTS samples (
        window_start INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        node TEXT NOT NULL,
        namespace TEXT NOT NULL,
        pod TEXT NOT NULL,
        container TEXT NOT NULL,
        process TEXT NOT NULL,
        pid INTEGER NOT NULL,
        stack_hash INTEGER NOT NULL,
        detail INTEGER NOT NULL,
        name TEXT NOT NULL,
        count INTEGER NOT NULL,
        total_ns INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        max_ns INTEGER NOT NULL,
        histogram TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS samples_kind_time ON samples (kind, window_start);
    CREATE INDEX IF NOT EXISTS samples_time ON samples (window_start);
    CREATE TABLE IF NOT EXISTS stacks (
        hash INTEGER PRIMARY KEY,
        frames TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS frame_ledger (
        agent_id TEXT NOT NULL,
        boot_id TEXT NOT NULL,
        watermark INTEGER NOT NULL,
        above TEXT NOT NULL,
        updated_s INTEGER NOT NULL,
        PRIMARY KEY (agent_id, boot_id)
    );",
    ),
    (
        2,
        "pushed profiles: service, tags, profile type",
        "ALTER TABLE samples ADD COLUMN service TEXT NOT NULL DEFAULT '';
        ALTER TABLE samples ADD COLUMN tags TEXT NOT NULL DEFAULT '';
        ALTER TABLE samples ADD COLUMN profile_type TEXT NOT NULL DEFAULT '';",
    ),
];
