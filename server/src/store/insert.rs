//! Owns multi-row INSERT statements for both ledger backends: every value bound, at most
//! [`VALUES_PER_STATEMENT`] of them per statement. The group commit, the embedded rows, the
//! outbox and the Hello writes all insert through here.

use sqlx::AssertSqlSafe;

use super::{Backend, StoreError};

/// Bound values per multi-row INSERT statement (SQLite allows 32 766, PostgreSQL 65 535).
/// With numbered placeholders sqlx-sqlite resolves each parameter's name by a linear scan, so
/// binding was quadratic in the values per statement (a 400-row statement spent 80 % of the
/// server's CPU there); SQLite statements therefore use anonymous `?` placeholders.
/// 1 024 rather than 4 096: each connection caches its prepared statements, whose size follows
/// their values; at 2 000 agents this saved 7 KiB of server memory a node with the same CPU
/// (BENCHMARKS.md).
pub(super) const VALUES_PER_STATEMENT: usize = 1024;

/// `(?, ?, ...)` (SQLite) or `($a, $b, ...)` (PostgreSQL) for one row of `width` values
/// starting after `*next`.
pub(super) fn placeholders(next: &mut usize, width: usize, backend: Backend) -> String {
    let mut row = String::with_capacity(width * 4 + 2);
    row.push('(');
    for i in 0..width {
        if i > 0 {
            row.push_str(", ");
        }
        *next += 1;
        match backend {
            // Anonymous parameters: sqlx-sqlite then binds each in O(1) (a numbered one costs
            // a linear scan of the statement's parameter names).
            Backend::Sqlite => row.push('?'),
            Backend::Postgres => {
                row.push('$');
                row.push_str(&next.to_string());
            }
        }
    }
    row.push(')');
    row
}

/// A value bound into a multi-row INSERT.
#[derive(Debug, Clone)]
pub(super) enum Value {
    /// An integer.
    I(i64),
    /// A float.
    F(f64),
    /// Text.
    T(String),
    /// Bytes.
    B(Vec<u8>),
}

/// `INSERT INTO table (columns) VALUES (...), ...` for `rows` rows, then `suffix`, with every
/// value bound (table and column names are constants of this module).
pub(super) fn insert_query(
    backend: Backend,
    table: &str,
    columns: &[&str],
    rows: Vec<Vec<Value>>,
    suffix: &str,
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    let mut sql = format!("INSERT INTO {table} ({}) VALUES ", columns.join(", "));
    let mut next = 0usize;
    for i in 0..rows.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&placeholders(&mut next, columns.len(), backend));
    }
    sql.push_str(suffix);
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for value in rows.into_iter().flatten() {
        query = match value {
            Value::I(v) => query.bind(v),
            Value::F(v) => query.bind(v),
            Value::T(v) => query.bind(v),
            Value::B(v) => query.bind(v),
        };
    }
    query
}

/// `rows` in statements of at most [`VALUES_PER_STATEMENT`] bound values, each of a row count
/// from a small fixed set: full statements, then the rest in power-of-two row counts, largest
/// first (45 rows: 32 + 8 + 4 + 1).
///
/// Each SQL text is a prepared statement that sqlx caches per connection (up to 100). With a
/// statement per row count, group commits of every size from 1 to the most filled the caches
/// with large statements: ~48 MiB of SQLite's heap at 1 000 agents (heaptrack,
/// BENCHMARKS.md), read as memory per connected node. Now a table has at most
/// `log2(most rows) + 2` statements, about 9.
pub(super) fn statements(rows: Vec<Vec<Value>>, columns: usize) -> Vec<Vec<Vec<Value>>> {
    let mut rows = rows.into_iter();
    statement_rows(rows.len(), columns)
        .map(|take| rows.by_ref().take(take).collect())
        .collect()
}

/// `items` cut as [`statements`] cuts rows: one slice per statement.
pub(super) fn statement_chunks<T>(items: &[T], columns: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    statement_rows(items.len(), columns).map(move |take| {
        let (chunk, after) = rest.split_at(take);
        rest = after;
        chunk
    })
}

/// The row counts of the statements that insert `total` rows of `columns` values.
fn statement_rows(total: usize, columns: usize) -> impl Iterator<Item = usize> {
    let rows_per_statement = (VALUES_PER_STATEMENT / columns.max(1)).max(1);
    let mut left = total;
    std::iter::from_fn(move || {
        let take = match left {
            0 => return None,
            n if n >= rows_per_statement => rows_per_statement,
            n => 1 << n.ilog2(),
        };
        left -= take;
        Some(take)
    })
}

/// Multi-row INSERT of `rows` into `table(columns)`, in statements of at most
/// [`VALUES_PER_STATEMENT`] bound values.
pub(super) async fn insert_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    backend: Backend,
    table: &str,
    columns: &[&str],
    rows: Vec<Vec<Value>>,
) -> Result<(), StoreError> {
    for chunk in statements(rows, columns.len()) {
        debug_assert!(chunk.iter().all(|row| row.len() == columns.len()));
        insert_query(backend, table, columns, chunk, "")
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_across_rows() {
        let mut next = 0;
        assert_eq!(placeholders(&mut next, 2, Backend::Postgres), "($1, $2)");
        assert_eq!(placeholders(&mut next, 2, Backend::Postgres), "($3, $4)");
        assert_eq!(placeholders(&mut next, 2, Backend::Sqlite), "(?, ?)");
    }

    fn sizes(rows: usize, columns: usize) -> Vec<usize> {
        let rows = vec![vec![Value::I(0); columns]; rows];
        statements(rows, columns).iter().map(Vec::len).collect()
    }

    #[test]
    fn statements_come_in_a_few_row_counts_and_keep_every_row_in_order() {
        assert_eq!(sizes(0, 4), Vec::<usize>::new());
        assert_eq!(sizes(45, 4), [32, 8, 4, 1]);
        let full = VALUES_PER_STATEMENT / 4;
        assert_eq!(sizes(2 * full + 3, 4), [full, full, 2, 1]);
        let mut shapes = std::collections::BTreeSet::new();
        for n in 1..=3000 {
            let got = sizes(n, 20);
            assert_eq!(got.iter().sum::<usize>(), n);
            assert!(got.iter().all(|&rows| rows * 20 <= VALUES_PER_STATEMENT));
            shapes.extend(got);
        }
        // A full statement, then every power of two below it.
        let full = VALUES_PER_STATEMENT / 20;
        assert_eq!(shapes.len(), full.ilog2() as usize + 2, "{shapes:?}");
        let rows: Vec<Vec<Value>> = (0..45).map(|i| vec![Value::I(i)]).collect();
        let flat: Vec<i64> = statements(rows, 1)
            .into_iter()
            .flatten()
            .map(|row| match row[0] {
                Value::I(v) => v,
                _ => -1,
            })
            .collect();
        assert_eq!(flat, (0..45).collect::<Vec<_>>());
        let items: Vec<u32> = (0..45).collect();
        let chunks: Vec<&[u32]> = statement_chunks(&items, 1).collect();
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [32, 8, 4, 1]
        );
        assert_eq!(chunks.concat(), items);
    }
}
