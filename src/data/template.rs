//! Row templates (`--template "Question: {question}\nAnswer: "`, `--completion-template
//! "{answer}"`): text built from a row's fields, for datasets of any shape.

use serde_json::{Map, Value};

/// A piece of a template.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Literal(String),
    Field(String),
}

/// A prompt template and an optional completion template. Without a completion template the
/// row is plain text; with one, it is a prompt/completion row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowTemplate {
    prompt: Vec<Piece>,
    completion: Option<Vec<Piece>>,
}

impl RowTemplate {
    /// Parses the templates: `{name}` is the row's field `name`, `{{` and `}}` are braces.
    pub fn parse(prompt: &str, completion: Option<&str>) -> Result<Self, String> {
        Ok(Self {
            prompt: parse_pieces(prompt).map_err(|e| format!("--template: {e}"))?,
            completion: completion
                .map(|c| parse_pieces(c).map_err(|e| format!("--completion-template: {e}")))
                .transpose()?,
        })
    }

    /// The prompt (or text) and the completion of a row; `Err` names a missing field. Strings
    /// are inserted as they are, other values as JSON.
    pub fn render(&self, fields: &Map<String, Value>) -> Result<(String, Option<String>), String> {
        Ok((
            fill(&self.prompt, fields)?,
            self.completion
                .as_ref()
                .map(|c| fill(c, fields))
                .transpose()?,
        ))
    }
}

fn parse_pieces(template: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                if !closed {
                    return Err(format!("unclosed {{{name} (write {{{{ for a brace)"));
                }
                if name.is_empty() || name.contains('{') {
                    return Err(format!(
                        "bad field reference {{{name}}} (write {{{{ for a brace)"
                    ));
                }
                if !literal.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Field(name));
            }
            '}' => return Err("unmatched } (write }} for a brace)".into()),
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    if !pieces.iter().any(|p| matches!(p, Piece::Field(_))) {
        return Err("the template uses no {field}".into());
    }
    Ok(pieces)
}

fn fill(pieces: &[Piece], fields: &Map<String, Value>) -> Result<String, String> {
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Literal(text) => out.push_str(text),
            Piece::Field(name) => match fields.get(name) {
                Some(Value::String(s)) => out.push_str(s),
                Some(Value::Null) | None => return Err(name.clone()),
                Some(other) => out.push_str(&other.to_string()),
            },
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fills_fields_and_escapes_braces() {
        let t = RowTemplate::parse("Q: {q} {{x}}\n", Some("{a}")).unwrap();
        let row = json!({"q": "why?", "a": {"n": 1}});
        let (prompt, completion) = t.render(row.as_object().unwrap()).unwrap();
        assert_eq!(prompt, "Q: why? {x}\n");
        assert_eq!(completion.as_deref(), Some("{\"n\":1}"));
        assert_eq!(
            t.render(json!({"a": 1}).as_object().unwrap()),
            Err("q".into())
        );
    }

    #[test]
    fn rejects_malformed_templates() {
        assert!(RowTemplate::parse("{q", None).is_err());
        assert!(RowTemplate::parse("a } b {q}", None).is_err());
        assert!(RowTemplate::parse("no fields", None).is_err());
        assert!(RowTemplate::parse("{}", None).is_err());
    }
}
