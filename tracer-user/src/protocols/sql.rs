//! SQL text helpers for span attributes: a literal-free statement, the operation verb, and the
//! main table. All three are cheap single passes over the text, not a SQL parser: they must
//! never fail, never panic on odd input (the text comes off the wire, possibly cut by the
//! capture limit), and never let a literal value through.
//!
//! The lexer knows the PostgreSQL lexical rules that matter for hiding values: `'...'` with
//! `''` escapes, `E'...'` with backslash escapes, `B'...'`/`X'...'`/`N'...'`/`U&'...'`,
//! dollar quoting (`$$...$$`, `$tag$...$tag$`), numbers (not the digits of identifiers such as
//! `t1`), `"quoted identifiers"`, `$1` parameters, and `--`/`/* */` comments (nested, as
//! PostgreSQL allows). A literal that is cut off by the end of the text is still hidden.

/// Longest operation name returned: a verb is short, the rest is noise.
const MAX_OPERATION: usize = 32;
/// Longest target returned.
const MAX_TARGET: usize = 128;

/// One lexical token. Literals carry no text: they are never needed, only hidden.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token<'a> {
    /// A keyword or unquoted identifier (may contain `.`-free identifier characters only).
    Word(&'a str),
    /// A `"quoted identifier"`, with its quotes.
    Quoted(&'a str),
    /// A string, number, bit or dollar-quoted literal.
    Literal,
    /// `$1`, `$2`...: a bind parameter, kept as is.
    Param(&'a str),
    /// Whitespace or a comment.
    Space,
    /// Any other character (operators, punctuation).
    Punct(&'a str),
}

struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || !c.is_ascii() && !c.is_whitespace()
}

fn is_ident_char(c: char) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == '$'
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Self { src, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn peek2(&self) -> Option<char> {
        self.rest().chars().nth(1)
    }

    /// Advances while `f` holds; returns the bytes taken.
    fn take_while(&mut self, f: impl Fn(char) -> bool) -> usize {
        let n = self
            .rest()
            .char_indices()
            .find(|&(_, c)| !f(c))
            .map_or(self.rest().len(), |(i, _)| i);
        self.pos += n;
        n
    }

    /// Skips a quoted run that starts at the current quote character; `backslash` for E''
    /// strings. An unterminated run ends the text.
    fn skip_quoted(&mut self, quote: char, backslash: bool) {
        let bytes = self.src.as_bytes();
        let q = quote as u8;
        let mut i = self.pos + 1;
        while i < bytes.len() {
            let b = bytes[i];
            if backslash && b == b'\\' {
                i += 2;
                continue;
            }
            if b == q {
                // A doubled quote is an escaped quote, not the end.
                if bytes.get(i + 1) == Some(&q) {
                    i += 2;
                    continue;
                }
                self.pos = i + 1;
                return;
            }
            i += 1;
        }
        self.pos = self.src.len();
    }

    fn skip_block_comment(&mut self) {
        let bytes = self.src.as_bytes();
        let mut depth = 0u32;
        let mut i = self.pos;
        while i + 1 < bytes.len() {
            match (bytes[i], bytes[i + 1]) {
                (b'/', b'*') => {
                    depth += 1;
                    i += 2;
                }
                (b'*', b'/') => {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        self.pos = i;
                        return;
                    }
                }
                _ => i += 1,
            }
        }
        self.pos = self.src.len();
    }

    /// At `$`: a dollar-quote opener `$tag$` returns the tag's length (including both `$`).
    fn dollar_tag(&self) -> Option<usize> {
        let rest = self.rest().as_bytes();
        let mut i = 1;
        while i < rest.len() {
            let b = rest[i];
            if b == b'$' {
                return Some(i + 1);
            }
            let ok = if i == 1 {
                b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
            } else {
                b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
            };
            if !ok {
                return None;
            }
            i += 1;
        }
        None
    }

    fn number(&mut self) {
        let rest = self.rest().as_bytes();
        if rest.len() > 1
            && rest[0] == b'0'
            && matches!(rest[1], b'x' | b'X' | b'o' | b'O' | b'b' | b'B')
        {
            self.pos += 2;
            self.take_while(|c| c.is_ascii_hexdigit() || c == '_');
            return;
        }
        self.take_while(|c| c.is_ascii_digit() || c == '_');
        if self.peek() == Some('.') && self.peek2() != Some('.') {
            self.pos += 1;
            self.take_while(|c| c.is_ascii_digit() || c == '_');
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            let save = self.pos;
            self.pos += 1;
            if matches!(self.peek(), Some('+' | '-')) {
                self.pos += 1;
            }
            if self.take_while(|c| c.is_ascii_digit()) == 0 {
                self.pos = save;
            }
        }
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let c = self.peek()?;
        let start = self.pos;
        let token = match c {
            c if c.is_whitespace() => {
                self.take_while(char::is_whitespace);
                Token::Space
            }
            '-' if self.peek2() == Some('-') => {
                self.take_while(|c| c != '\n');
                Token::Space
            }
            '/' if self.peek2() == Some('*') => {
                self.skip_block_comment();
                Token::Space
            }
            '\'' => {
                self.skip_quoted('\'', false);
                Token::Literal
            }
            '"' => {
                self.skip_quoted('"', false);
                Token::Quoted(&self.src[start..self.pos])
            }
            '$' if self.peek2().is_some_and(|c| c.is_ascii_digit()) => {
                self.pos += 1;
                self.take_while(|c| c.is_ascii_digit());
                Token::Param(&self.src[start..self.pos])
            }
            '$' => match self.dollar_tag() {
                Some(n) => {
                    let tag = &self.src[start..start + n];
                    let body = start + n;
                    self.pos = self.src[body..]
                        .find(tag)
                        .map_or(self.src.len(), |i| body + i + n);
                    Token::Literal
                }
                None => {
                    self.pos += 1;
                    Token::Punct(&self.src[start..self.pos])
                }
            },
            c if c.is_ascii_digit() => {
                self.number();
                Token::Literal
            }
            '.' if self.peek2().is_some_and(|c| c.is_ascii_digit()) => {
                self.pos += 1;
                self.number();
                Token::Literal
            }
            c if is_ident_start(c) => {
                self.take_while(is_ident_char);
                let word = &self.src[start..self.pos];
                let prefixed = matches!(word, "E" | "e" | "B" | "b" | "X" | "x" | "N" | "n");
                if prefixed && self.peek() == Some('\'') {
                    self.skip_quoted('\'', matches!(word, "E" | "e"));
                    Token::Literal
                } else if matches!(word, "U" | "u") && self.rest().starts_with("&'") {
                    self.pos += 1;
                    self.skip_quoted('\'', false);
                    Token::Literal
                } else {
                    Token::Word(word)
                }
            }
            c => {
                self.pos += c.len_utf8();
                Token::Punct(&self.src[start..self.pos])
            }
        };
        Some(token)
    }
}

/// The statement with every literal replaced by `?`, comments dropped, whitespace collapsed,
/// `IN (?, ?, ?)` lists folded to `IN (?)`, and at most `max_len` bytes long (a cut statement
/// ends in `...`). Identifiers, keywords and `$n` parameters are kept as written.
pub fn normalize_sql(sql: &str, max_len: usize) -> String {
    let mut out = String::with_capacity(sql.len().min(max_len.saturating_add(8)));
    let mut space = false;
    // State of `IN (` list folding: Some(position of the `(` in `out`) while every item of the
    // list so far was a placeholder.
    let mut after_in = false;
    let mut in_list: Option<usize> = None;
    let mut list_only_literals = true;
    for token in Lexer::new(sql) {
        if token == Token::Space {
            space = !out.is_empty();
            continue;
        }
        if out.len() > max_len {
            break;
        }
        let text = match token {
            Token::Word(w) | Token::Quoted(w) | Token::Param(w) | Token::Punct(w) => w,
            Token::Literal => "?",
            Token::Space => continue,
        };
        if let Some(open) = in_list {
            match token {
                Token::Punct(")") => {
                    if list_only_literals {
                        out.truncate(open + 1);
                        out.push_str("?)");
                        in_list = None;
                        space = false;
                        continue;
                    }
                    in_list = None;
                }
                Token::Literal | Token::Param(_) | Token::Punct(",") => {}
                Token::Punct("-" | "+") => {}
                _ => {
                    list_only_literals = false;
                    in_list = None;
                }
            }
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push_str(text);
        if after_in && token == Token::Punct("(") {
            in_list = Some(out.len() - 1);
            list_only_literals = true;
        }
        after_in = matches!(token, Token::Word(w) if w.eq_ignore_ascii_case("IN"));
    }
    truncate_str(&mut out, max_len);
    out
}

/// Cuts `s` to at most `max_len` bytes on a character boundary, marking the cut with `...`.
fn truncate_str(s: &mut String, max_len: usize) {
    if s.len() <= max_len {
        return;
    }
    let mut cut = max_len.saturating_sub(3);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push_str(&"..."[..max_len.min(3)]);
}

/// Tokens that carry meaning for the operation and target: no spaces or comments.
fn words(sql: &str) -> impl Iterator<Item = Token<'_>> {
    Lexer::new(sql).filter(|t| *t != Token::Space)
}

fn upper_word(w: &str) -> String {
    let mut s: String = w.chars().take(MAX_OPERATION).collect();
    s.make_ascii_uppercase();
    s
}

/// The verbs that can follow a `WITH` clause.
const MAIN_VERBS: [&str; 7] = [
    "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "TABLE",
];

/// Where the main statement starts: after any leading parentheses and, for `WITH`, after the
/// common table expressions. Returns the verb and the tokens after it.
fn main_statement(sql: &str) -> Option<(String, Vec<Token<'_>>)> {
    let mut tokens = words(sql).skip_while(|t| *t == Token::Punct("("));
    let first = match tokens.next()? {
        Token::Word(w) => w,
        _ => return None,
    };
    let verb = upper_word(first);
    if verb != "WITH" {
        // Only what the target rule needs: a short look-ahead keeps this O(prefix).
        return Some((verb, tokens.take(4096).collect()));
    }
    let mut depth = 0u32;
    let mut rest = tokens.take(1 << 16);
    while let Some(t) = rest.next() {
        match t {
            Token::Punct("(") => depth += 1,
            Token::Punct(")") => depth = depth.saturating_sub(1),
            Token::Word(w) if depth == 0 => {
                if let Some(v) = MAIN_VERBS.iter().find(|v| w.eq_ignore_ascii_case(v)) {
                    return Some(((*v).to_owned(), rest.take(4096).collect()));
                }
            }
            _ => {}
        }
    }
    Some((verb, Vec::new()))
}

/// The operation: the statement's first keyword in upper case (`SELECT`, `BEGIN`...), or the
/// verb of the main statement after a `WITH` clause; `UNKNOWN` when there is no keyword.
pub fn sql_operation(sql: &str) -> String {
    main_statement(sql).map_or_else(|| "UNKNOWN".to_owned(), |(verb, _)| verb)
}

/// The main table, when the statement names it in the usual place: `SELECT ... FROM t`,
/// `DELETE FROM t`, `INSERT INTO t`, `UPDATE t`, `MERGE INTO t`, `COPY t`, `TRUNCATE t`.
/// Schema-qualified names are kept (`s.t`); quoted identifiers lose their quotes.
pub fn sql_target(sql: &str) -> Option<String> {
    let (verb, tokens) = main_statement(sql)?;
    let keyword = match verb.as_str() {
        "SELECT" | "DELETE" => "FROM",
        "INSERT" | "MERGE" => "INTO",
        "UPDATE" | "COPY" | "TRUNCATE" | "TABLE" => {
            return table_name(&tokens, 0);
        }
        _ => return None,
    };
    let mut depth = 0u32;
    for (i, t) in tokens.iter().enumerate() {
        match t {
            Token::Punct("(") => depth += 1,
            Token::Punct(")") => depth = depth.saturating_sub(1),
            Token::Word(w) if depth == 0 && w.eq_ignore_ascii_case(keyword) => {
                return table_name(&tokens, i + 1);
            }
            _ => {}
        }
    }
    None
}

/// The possibly qualified name at `tokens[at..]`, skipping `ONLY`/`TABLE` noise words.
fn table_name(tokens: &[Token<'_>], mut at: usize) -> Option<String> {
    while let Some(Token::Word(w)) = tokens.get(at) {
        if ["ONLY", "TABLE", "LATERAL"]
            .iter()
            .any(|k| w.eq_ignore_ascii_case(k))
        {
            at += 1;
        } else {
            break;
        }
    }
    let mut name = String::new();
    loop {
        match tokens.get(at)? {
            Token::Word(w) => name.push_str(w),
            Token::Quoted(q) => name.push_str(q.trim_matches('"')),
            _ => return None,
        }
        if tokens.get(at + 1) == Some(&Token::Punct(".")) && name.len() < MAX_TARGET {
            name.push('.');
            at += 2;
        } else {
            break;
        }
    }
    // A keyword where a name should be (`SELECT ... FROM (subquery)` was caught above; this is
    // e.g. `DELETE FROM WHERE`, a syntax error) is still a word; nothing better is known.
    truncate_str(&mut name, MAX_TARGET);
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(sql: &str) -> String {
        normalize_sql(sql, 1000)
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(
            n("SELECT * FROM t WHERE a = 'x'"),
            "SELECT * FROM t WHERE a = ?"
        );
        assert_eq!(n("SELECT 'it''s', 'b'"), "SELECT ?, ?");
        assert_eq!(n(r"SELECT E'a\'b', e'\\'"), "SELECT ?, ?");
        assert_eq!(
            n("SELECT B'1010', X'ff', N'nat', U&'d\\0061'"),
            "SELECT ?, ?, ?, ?"
        );
        assert_eq!(n("SELECT 'unterminated"), "SELECT ?");
        assert_eq!(n("SELECT '' || ''"), "SELECT ? || ?");
        // A word that merely ends in e is not a prefix.
        assert_eq!(n("SELECT name'x'"), "SELECT name?");
    }

    #[test]
    fn dollar_quoting_and_params() {
        assert_eq!(n("SELECT $$a 'b' $c$$, 1"), "SELECT ?, ?");
        assert_eq!(n("DO $body$ BEGIN RAISE '$$'; END $body$"), "DO ?");
        assert_eq!(n("SELECT $fn$ unterminated"), "SELECT ?");
        assert_eq!(
            n("SELECT * FROM t WHERE a = $1 AND b = $12"),
            "SELECT * FROM t WHERE a = $1 AND b = $12"
        );
        assert_eq!(n("SELECT a$b FROM t"), "SELECT a$b FROM t");
    }

    #[test]
    fn numbers_but_not_identifiers() {
        assert_eq!(
            n("SELECT 1, 2.5, .5, 1e10, 1.5E-3, 0x1F, 1_000"),
            "SELECT ?, ?, ?, ?, ?, ?, ?"
        );
        assert_eq!(
            n("SELECT t1.c2, \"col2\" FROM t1 LIMIT 10"),
            "SELECT t1.c2, \"col2\" FROM t1 LIMIT ?"
        );
        assert_eq!(n("SELECT a-1, -2"), "SELECT a-?, -?");
        assert_eq!(n("SELECT x::int4[] FROM t"), "SELECT x::int4[] FROM t");
        assert_eq!(n("SELECT arr[1:2]"), "SELECT arr[?:?]");
        assert_eq!(n("SELECT TRUE, false, NULL"), "SELECT TRUE, false, NULL");
    }

    #[test]
    fn in_lists_fold() {
        assert_eq!(
            n("SELECT * FROM t WHERE id IN (1, 2, 3)"),
            "SELECT * FROM t WHERE id IN (?)"
        );
        assert_eq!(
            n("select * from t where id in ('a','b') and x in ($1, $2)"),
            "select * from t where id in (?) and x in (?)"
        );
        assert_eq!(
            n("SELECT * FROM t WHERE id IN (SELECT id FROM u)"),
            "SELECT * FROM t WHERE id IN (SELECT id FROM u)"
        );
        assert_eq!(
            n("SELECT * FROM t WHERE id IN (-1, 2)"),
            "SELECT * FROM t WHERE id IN (?)"
        );
        assert_eq!(
            n("INSERT INTO t VALUES (1, 'a'), (2, 'b')"),
            "INSERT INTO t VALUES (?, ?), (?, ?)"
        );
    }

    #[test]
    fn comments_and_whitespace() {
        assert_eq!(
            n("  SELECT\n\t1 -- one\n  FROM /* a /* nested */ b */ t  "),
            "SELECT ? FROM t"
        );
        assert_eq!(n("/* only */"), "");
        assert_eq!(n("SELECT 1 -- trailing"), "SELECT ?");
        assert_eq!(n("SELECT 1 /* unterminated"), "SELECT ?");
        assert_eq!(n("SELECT a--b\n"), "SELECT a");
    }

    #[test]
    fn bounded_and_char_boundary_safe() {
        let long = format!("SELECT {} FROM t", "ééééé, ".repeat(100));
        for max in [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 50] {
            let s = normalize_sql(&long, max);
            assert!(s.len() <= max, "{max}: {s}");
            if max >= 3 {
                assert!(s.ends_with("..."), "{max}: {s}");
            }
        }
        assert_eq!(normalize_sql("SELECT 1", 8), "SELECT ?");
        assert_eq!(normalize_sql("SELECT 1, 2", 8), "SELEC...");
        // Work is bounded by the output, not the input.
        let huge = "SELECT ".to_owned() + &"1, ".repeat(1_000_000);
        assert_eq!(normalize_sql(&huge, 20).len(), 20);
    }

    #[test]
    fn operation() {
        assert_eq!(sql_operation("select 1"), "SELECT");
        assert_eq!(
            sql_operation("  -- c\n /* x */ insert into t values (1)"),
            "INSERT"
        );
        assert_eq!(sql_operation("(SELECT 1) UNION (SELECT 2)"), "SELECT");
        assert_eq!(sql_operation("BEGIN"), "BEGIN");
        assert_eq!(sql_operation("commit;"), "COMMIT");
        assert_eq!(
            sql_operation(
                "WITH a AS (SELECT 1), b(x) AS MATERIALIZED (DELETE FROM t RETURNING *) UPDATE u SET v = 1"
            ),
            "UPDATE"
        );
        assert_eq!(
            sql_operation("WITH RECURSIVE r AS (SELECT 1 UNION SELECT 2) SELECT * FROM r"),
            "SELECT"
        );
        assert_eq!(sql_operation("WITH a AS (SELECT 1"), "WITH");
        assert_eq!(sql_operation(""), "UNKNOWN");
        assert_eq!(sql_operation("'x'"), "UNKNOWN");
        assert_eq!(sql_operation(&"A".repeat(100)).len(), MAX_OPERATION);
    }

    #[test]
    fn target() {
        let t = |s: &str| sql_target(s);
        assert_eq!(
            t("SELECT * FROM cats WHERE id = 1").as_deref(),
            Some("cats")
        );
        assert_eq!(
            t("select a from public.cats c join dogs d on true").as_deref(),
            Some("public.cats")
        );
        assert_eq!(
            t("SELECT (SELECT max(x) FROM inner_t) FROM outer_t").as_deref(),
            Some("outer_t")
        );
        assert_eq!(t("SELECT * FROM (SELECT 1) s"), None);
        assert_eq!(t("SELECT 1"), None);
        assert_eq!(
            t("INSERT INTO \"Orders\" (a) VALUES (1)").as_deref(),
            Some("Orders")
        );
        assert_eq!(t("UPDATE ONLY users SET a = 1").as_deref(), Some("users"));
        assert_eq!(t("DELETE FROM s.t WHERE x").as_deref(), Some("s.t"));
        assert_eq!(
            t("WITH x AS (SELECT * FROM a) INSERT INTO b SELECT * FROM x").as_deref(),
            Some("b")
        );
        assert_eq!(t("TRUNCATE TABLE logs").as_deref(), Some("logs"));
        assert_eq!(t("BEGIN"), None);
        assert_eq!(t("SELECT * FROM"), None);
        assert!(
            t(&format!("SELECT * FROM {}", "x".repeat(1000)))
                .is_some_and(|s| s.len() <= MAX_TARGET)
        );
    }

    #[test]
    fn arbitrary_text_never_panics() {
        let samples = [
            "",
            "'",
            "\"",
            "$",
            "$$",
            "$a",
            "$a$",
            "/*",
            "--",
            "E'",
            "U&",
            "U&'",
            "0x",
            "1e",
            "1e+",
            ".",
            "..",
            "é'",
            "\u{0}",
            "$é$x$é$",
            "((((",
            "))))",
            "WITH",
            "WITH (",
            "IN (",
            "IN ()",
        ];
        for a in samples {
            for b in samples {
                let s = format!("{a}{b}{a}");
                let _ = normalize_sql(&s, 16);
                let _ = sql_operation(&s);
                let _ = sql_target(&s);
            }
        }
    }
}
