using System.Text.Json.Serialization;

namespace VlmTune.Serving;

/// <summary>
/// An error the client caused or must hear about, answered in OpenAI's shape
/// <c>{"error":{"message","type","param","code"}}</c>. Messages are written for the client: they never carry paths,
/// addresses or exception details of the server.
/// </summary>
public sealed class ApiException(int status, string message, string? param = null, string? code = null, string? type = null) : Exception(message)
{
    public int Status { get; } = status;
    public string? Param { get; } = param;
    public string? Code { get; } = code;
    public string Type { get; } = type ?? status switch
    {
        401 => "authentication_error",
        404 => "invalid_request_error",
        429 => "rate_limit_exceeded",
        >= 500 => "server_error",
        _ => "invalid_request_error",
    };

    public ErrorBody Body => new(new ErrorDetail(Message, Type, Param, Code));

    public static ApiException BadRequest(string message, string? param = null, string? code = null) => new(400, message, param, code);
}

public sealed record ErrorBody([property: JsonPropertyName("error")] ErrorDetail Error);

public sealed record ErrorDetail(
    [property: JsonPropertyName("message")] string Message,
    [property: JsonPropertyName("type")] string Type,
    [property: JsonPropertyName("param")] string? Param,
    [property: JsonPropertyName("code")] string? Code);
