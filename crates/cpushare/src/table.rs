//! Output for people (aligned tables) or programs (`--json`).

use serde_json::Value;

#[derive(Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints rows of a table, or the same rows as a JSON array of objects.
    pub fn table(&self, headers: &[&str], rows: Vec<Vec<Value>>) {
        if self.json {
            let objects: Vec<Value> = rows
                .into_iter()
                .map(|r| Value::Object(headers.iter().map(|h| h.to_string()).zip(r).collect()))
                .collect();
            println!("{}", serde_json::to_string_pretty(&objects).unwrap());
            return;
        }
        let cells: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(plain).collect()).collect();
        let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |row: Vec<String>| {
            row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
        };
        println!("{}", line(headers.iter().map(|h| h.to_uppercase()).collect()));
        for row in cells {
            println!("{}", line(row));
        }
        if rows.is_empty() {
            println!("(none)");
        }
    }

    /// Prints one record: `key: value` lines, or a JSON object.
    pub fn record(&self, fields: Vec<(&str, Value)>) {
        if self.json {
            let object: serde_json::Map<String, Value> = fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            println!("{}", serde_json::to_string_pretty(&Value::Object(object)).unwrap());
            return;
        }
        let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in fields {
            println!("{k:<width$}  {}", plain(&v));
        }
    }
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}
