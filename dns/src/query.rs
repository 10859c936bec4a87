//! A DNS query as the faults see it: parsed once with hickory-proto, with
//! what matching needs (name, type) and what an answer copies (id, flags,
//! question, EDNS). It must not judge the query: that is `decide`'s.

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query as Question};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use crate::NotHandled;

/// Bytes of the DNS header.
const HEADER_LEN: usize = 12;
/// The least a question takes: the root name (1 byte), type and class.
const MIN_QUESTION: usize = 5;
/// The least a resource record takes: the root name, type, class, TTL and
/// RDLENGTH.
const MIN_RECORD: usize = 11;

/// A standard DNS query with one question.
#[derive(Debug, Clone)]
pub struct Query {
    pub(crate) header: Header,
    pub(crate) question: Question,
    /// The question's name in presentation form, as sent (case kept).
    name: String,
    qtype: u16,
    pub(crate) edns: Option<Edns>,
}

impl Query {
    /// Parses a DNS message (no TCP length prefix). A message that does not
    /// parse is [`NotHandled::Malformed`]; one that parses but is not a
    /// standard query with exactly one question is [`NotHandled::NotAQuery`].
    pub fn parse(msg: &[u8]) -> Result<Query, NotHandled> {
        let header = Header::read(&mut BinDecoder::new(msg))
            .map_err(|e| NotHandled::Malformed(format!("header: {e}")))?;
        // hickory reserves room for every counted entry before reading
        // them: refuse counts the message cannot hold, so that 12 random
        // bytes do not cost megabytes.
        let records = usize::from(header.answer_count())
            + usize::from(header.name_server_count())
            + usize::from(header.additional_count());
        let least = usize::from(header.query_count()) * MIN_QUESTION + records * MIN_RECORD;
        if least > msg.len().saturating_sub(HEADER_LEN) {
            return Err(NotHandled::Malformed(format!(
                "{} questions and {records} records cannot fit in {} bytes",
                header.query_count(),
                msg.len()
            )));
        }
        let message = Message::from_vec(msg).map_err(|e| NotHandled::Malformed(e.to_string()))?;
        if message.message_type() != MessageType::Query
            || message.op_code() != OpCode::Query
            || message.queries().len() != 1
        {
            return Err(NotHandled::NotAQuery);
        }
        let mut parts = message.into_parts();
        let Some(question) = parts.queries.pop() else {
            return Err(NotHandled::NotAQuery);
        };
        Ok(Query {
            header: parts.header,
            name: question.name().to_ascii(),
            qtype: u16::from(question.query_type()),
            question,
            edns: parts.edns,
        })
    }

    pub fn id(&self) -> u16 {
        self.header.id()
    }

    /// The question's name as sent, e.g. `API.example.test.` (matching is
    /// case-insensitive).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn qtype(&self) -> u16 {
        self.qtype
    }
}
