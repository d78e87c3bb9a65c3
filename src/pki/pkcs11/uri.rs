//! The part of RFC 7512 `pkcs11:` URIs the operator reads: the token label, the
//! object label and (in `signing-key`'s reference) the object id. Anything else is
//! refused by name rather than ignored, so that a URI never means less than it says.

/// A key named by a `pkcs11:` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyUri {
    /// `token=`: the label of the token holding the key.
    pub token: String,
    /// `object=`: the label of the key object (CKA_LABEL).
    pub object: String,
    /// `id=`: the key object's CKA_ID, when given.
    pub id: Option<Vec<u8>>,
}

impl KeyUri {
    /// Parses `pkcs11:token=...;object=...[;id=...][;type=private]`. Errors name the
    /// problem and quote no more than the attribute name.
    pub fn parse(text: &str) -> Result<Self, String> {
        let path = text.trim().strip_prefix("pkcs11:").ok_or("a PKCS#11 URI starts with \"pkcs11:\" (RFC 7512)")?;
        if path.contains('?') {
            return Err("query attributes (after '?', e.g. pin-value or module-path) are not supported: \
                        give the module and the PIN with --pkcs11-module and --pkcs11-pin-file"
                .into());
        }
        let (mut token, mut object, mut id) = (None, None, None);
        for attribute in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attribute.split_once('=').ok_or("a URI attribute has no '='")?;
            let value = percent_decode(value)?;
            let slot = match name {
                "token" => &mut token,
                "object" => &mut object,
                "id" => {
                    if id.replace(value).is_some() {
                        return Err("attribute id is given twice".into());
                    }
                    continue;
                }
                "type" if value == b"private" => continue,
                "type" => return Err("only type=private is supported (the CA's private key)".into()),
                other => {
                    return Err(format!(
                        "attribute {:?} is not supported (supported: token, object, id, type=private)",
                        crate::bounded(other)
                    ));
                }
            };
            let text = String::from_utf8(value).map_err(|_| format!("attribute {name} is not UTF-8"))?;
            if slot.replace(text).is_some() {
                return Err(format!("attribute {name} is given twice"));
            }
        }
        let token = token.filter(|t| !t.is_empty()).ok_or("the URI names no token (token=<label>)")?;
        let object = object.filter(|o| !o.is_empty()).ok_or("the URI names no key (object=<label>)")?;
        Ok(KeyUri { token, object, id })
    }

    /// The URI of this key, with every byte outside RFC 7512's unreserved set escaped.
    pub fn render(&self) -> String {
        let (token, object) = (percent_encode(self.token.as_bytes()), percent_encode(self.object.as_bytes()));
        let mut uri = format!("pkcs11:token={token};object={object}");
        if let Some(id) = &self.id {
            uri.push_str(";id=");
            // Ids are binary: every byte escaped, as pkcs11-tool and p11tool print them.
            for byte in id {
                uri.push_str(&format!("%{byte:02x}"));
            }
        }
        uri.push_str(";type=private");
        uri
    }
}

fn percent_decode(value: &str) -> Result<Vec<u8>, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'%' {
            let hex = tail.get(..2).and_then(|h| std::str::from_utf8(h).ok()).ok_or("a '%' escape is cut short")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "a '%' escape is not hexadecimal")?);
            rest = tail.get(2..).unwrap_or_default();
        } else {
            out.push(first);
            rest = tail;
        }
    }
    Ok(out)
}

fn percent_encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02x}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_token_object_and_id() {
        let uri = KeyUri::parse("pkcs11:token=service%20ca;object=ca-key;id=%01%ab;type=private").unwrap();
        assert_eq!(uri, KeyUri { token: "service ca".into(), object: "ca-key".into(), id: Some(vec![1, 0xab]) });
        assert_eq!(KeyUri::parse(&uri.render()).unwrap(), uri);
        assert_eq!(uri.render(), "pkcs11:token=service%20ca;object=ca-key;id=%01%ab;type=private");
    }

    #[test]
    fn refuses_what_it_does_not_read() {
        for (uri, needle) in [
            ("token=a;object=b", "starts with"),
            ("pkcs11:token=a", "no key"),
            ("pkcs11:object=b", "no token"),
            ("pkcs11:token=a;object=b?pin-value=1234", "query"),
            ("pkcs11:token=a;object=b;slot-id=3", "slot-id"),
            ("pkcs11:token=a;object=b;type=cert", "type=private"),
            ("pkcs11:token=a;object=b;id=%0", "cut short"),
            ("pkcs11:token=a;token=c;object=b", "twice"),
        ] {
            let error = KeyUri::parse(uri).unwrap_err();
            assert!(error.contains(needle), "{uri}: {error}");
            assert!(!error.contains("1234"), "the PIN is never echoed: {error}");
        }
    }
}
