//! Path globs for the `http.path` selector: `*` matches any run of
//! characters, `/` included; `?` matches exactly one character. Nothing else
//! is special. Matching backtracks only to the last `*` (at most
//! pattern length × path length steps), so no pattern can blow it up.

/// Whether `text` matches `pattern`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    // Where the last `*` was, and the text position it currently covers up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some('?') => {
                pi += 1;
                ti += 1;
            }
            Some(c) if *c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character and retry.
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi.min(p.len())..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn stars_cross_slashes_and_question_marks_take_one() {
        let cases = [
            ("/api/*", "/api/users/7", true),
            ("/api/*", "/api/", true),
            ("/api/*", "/api", false),
            ("/api/*/orders", "/api/u/7/orders", true),
            ("/api/*/orders", "/api/u/7/orders/1", false),
            ("*", "/", true),
            ("*", "", true),
            ("/", "/", true),
            ("/a?c", "/abc", true),
            ("/a?c", "/ac", false),
            ("/a?c", "/abbc", false),
            ("*.json", "/x/y.json", true),
            ("*.json", "/x/y.jsonx", false),
            ("/a*b*c", "/axxbyyc", true),
            ("/a*b*c", "/axxbyy", false),
            ("/exact", "/exact", true),
            ("/exact", "/exactly", false),
            ("/*/*/*", "/a/b", false),
            ("/**", "/a", true),
            ("/é?", "/éx", true),
        ];
        for (p, t, want) in cases {
            assert_eq!(glob_match(p, t), want, "{p} ~ {t}");
        }
    }

    #[test]
    fn pathological_patterns_stay_fast() {
        let text = "/".to_string() + &"a".repeat(10_000);
        let pattern = "/".to_string() + &"*a".repeat(50) + "b";
        let start = std::time::Instant::now();
        assert!(!glob_match(&pattern, &text));
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }
}
